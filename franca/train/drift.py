"""Drift monitor: how far the teacher's features have moved from those of the backbone the run started from.

When a run starts from pretrained weights (``student.pretrained_weights``), fresh heads can pull the backbone apart
before they learn anything useful: k-NN accuracy collapses within the first iterations after the backbone is
unfrozen (reported for DINOv2 in facebookresearch/dinov2 issue 204). The monitor measures it directly: on a fixed
probe set of ``train.drift_probe_images`` training images (evenly spaced over the dataset, under the evaluation
transform at the global-crop size), the mean cosine between the starting backbone's features and the current
teacher's, for the CLS token (``drift_cls_cos``) and the mean patch token (``drift_patch_cos``). 1.0 means unchanged.

The starting features are computed once, before any training step, from the initialised model (also on resume: the
model is built and initialised from the pretrained weights before the checkpoint is loaded), and kept on the device.
A warning names the knobs when ``drift_cls_cos`` falls below 1 − ``train.drift_warning_drop`` within the first
``train.drift_warning_window`` iterations after the backbone starts training (until then the teacher backbone does
not move, so the cosine is exactly 1).
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from franca.data.augmentations import make_classification_eval_transform
from franca.train.build import training_dataset

DRIFT_KEYS = ("drift_cls_cos", "drift_patch_cos")


def probe_indices(size: int, count: int) -> list[int]:
    """``count`` indices evenly spaced over ``range(size)`` (all of them when the dataset is smaller)."""
    if count >= size:
        return list(range(size))
    return torch.linspace(0, size - 1, count).round().long().tolist()


def load_probe_images(cfg: DictConfig) -> torch.Tensor | None:
    """The probe images [N, 3, S, S] of the run (S = ``crops.global_crops_size``), decoded as the training images; None
    when the dataset is a stream (no fixed images to come back to)."""
    size = cfg.crops.global_crops_size
    dataset: Dataset = training_dataset(cfg, transform=make_classification_eval_transform(size, size))
    if isinstance(dataset, IterableDataset):
        return None
    return torch.stack([dataset[i][0] for i in probe_indices(len(dataset), cfg.train.drift_probe_images)])


@torch.no_grad()
def probe_features(backbone: nn.Module, images: torch.Tensor, autocast_dtype: torch.dtype | None) -> dict:
    """CLS [N, D] and mean patch [N, D] features of ``images`` (fp32), with the backbone in eval mode (its mode is
    restored)."""
    was_training = backbone.training
    backbone.eval()
    try:
        dtype = next(p.dtype for p in backbone.parameters())
        with torch.autocast(images.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = backbone.forward_features(images.to(dtype))
    finally:
        backbone.train(was_training)
    return {"cls": out["x_norm_clstoken"].float(), "patch": out["x_norm_patchtokens"].float().mean(dim=1)}


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the cosine between rows of ``a`` and ``b`` [N, D]."""
    return float(F.cosine_similarity(a, b, dim=-1).mean())


@dataclass
class DriftMonitor:
    """The probe images, the starting features and the warning rule of one run (see the module docstring)."""

    images: torch.Tensor
    start: dict[str, torch.Tensor]
    autocast_dtype: torch.dtype | None
    backbone_start: int
    drop: float
    window: int
    _warned: bool = field(default=False, init=False)

    @classmethod
    def for_run(
        cls, cfg: DictConfig, backbone: nn.Module, device: torch.device, autocast_dtype: torch.dtype | None
    ) -> "DriftMonitor | None":
        """The monitor of a run that starts from ``student.pretrained_weights`` (None otherwise, or with
        ``train.drift_probe_images`` 0); ``backbone`` is the initialised teacher backbone, before any step."""
        if not cfg.student.pretrained_weights or cfg.train.drift_probe_images == 0:
            return None
        images = load_probe_images(cfg)
        if images is None:
            print("drift monitor off: train.dataset_path is a stream, with no fixed probe images", flush=True)
            return None
        images = images.to(device)
        return cls(
            images,
            probe_features(backbone, images, autocast_dtype),
            autocast_dtype,
            backbone_start=cfg.train.freeze_backbone_iterations,
            drop=cfg.train.drift_warning_drop,
            window=cfg.train.drift_warning_window,
        )

    def measure(self, backbone: nn.Module) -> dict[str, float]:
        """``drift_cls_cos`` and ``drift_patch_cos`` of the current ``backbone`` against the start."""
        now = probe_features(backbone, self.images, self.autocast_dtype)
        return {f"drift_{kind}_cos": mean_cosine(now[kind], self.start[kind]) for kind in ("cls", "patch")}

    def update(self, values: dict[str, float], iteration: int) -> list[str]:
        """Warnings (at most one per run) for the values measured after ``iteration``."""
        since = iteration - self.backbone_start
        fall = 1.0 - values["drift_cls_cos"]  # the teacher backbone has not moved before the backbone trains
        if self._warned or not 0 <= since < self.window or fall <= self.drop:
            return []
        self._warned = True
        return [
            f"the backbone is moving fast away from its pretrained features: drift_cls_cos fell by {fall:.2f} (to "
            f"{values['drift_cls_cos']:.2f}) within {since + 1} iterations of training the backbone. Fresh heads can "
            "pull a pretrained backbone apart; lower optim.backbone_lr_mult, lengthen "
            "optim.backbone_warmup_iterations or train.freeze_backbone_iterations (heads first), or lower "
            "optim.layerwise_decay (training.md, 'Adapt a backbone to your images')"
        ]


def format_drift(values: dict[str, float]) -> str:
    """The progress line's drift part: ``, drift cls 0.984 patch 0.951`` (empty without the monitor)."""
    if not values:
        return ""
    return f", drift cls {values['drift_cls_cos']:.3f} patch {values['drift_patch_cos']:.3f}"
