"""Linear semantic segmentation on frozen patch features (Franca's "ADE20K lin. seg." column,
valeoai/Franca README v1.0.0).

The head is BatchNorm + a 1×1 convolution (one linear map per patch; BN only rescales and shifts each channel, as
DINOv2's linear segmentation head) on the final normed patch tokens, or with ``--n-last-blocks 4`` on the normed patch
tokens of the last four blocks concatenated. Train features are computed once (no augmentation) and kept on the CPU
in fp16 (N · h · w · D' · 2 bytes); the head is trained with cross-entropy (255 ignored) by AdamW or SGD with a
cosine learning-rate decay to 0, its logits upsampled bilinearly to the training masks.

Two protocols, which differ by several mIoU points on ADE20K, so a number is only comparable within one:

- ``franca`` (as Franca reports linear segmentation; the Leopart/NeCo protocol of its authors): images resized to
  448×448 (without ``--protocol``: to the size the checkpoint was trained at, or ``--image-size``); train and val
  masks resized by nearest neighbour to 100×100 (to the image size when that is smaller: a 64 px model is scored
  on 64×64 masks); logits upsampled bilinearly to the mask size; mIoU over the val set there.
- ``dinov2`` (full-resolution evaluation as DINOv2's linear segmentation): images resized to 504×504, train masks
  resized by nearest neighbour to 504×504; val logits upsampled bilinearly to each image's original mask size and mIoU
  computed there. (DINOv2 trains on random 512² crops and tests with a sliding window; here one resized view.)

``python -m franca.eval.linear_seg --weights W [--rasa-weights R] --train-dataset STR --val-dataset STR
--output-dir D [--protocol franca|dinov2]``. Without ``--protocol`` the ``franca`` mask sizes are used at the
checkpoint's own image size; naming a protocol also takes its image size.
"""

import argparse
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from franca.eval.lib import common
from franca.eval.lib.segmentation import (
    IGNORE_INDEX,
    PairedTransformDataset,
    SegmentationTransform,
    check_input_size,
    confusion_matrix,
    dataset_num_classes,
    iterate_dense_batches,
    segmentation_metrics,
)
from franca.utils.features import default_device
from franca.utils.logging import Progress


@dataclass(frozen=True)
class Protocol:
    """Image size fed to the backbone, and the mask size of training and of evaluation (None = original size)."""

    name: str
    input_size: tuple[int, int]
    train_mask_size: tuple[int, int] | None
    eval_mask_size: tuple[int, int] | None


PROTOCOLS = {
    "franca": Protocol("franca", (448, 448), (100, 100), (100, 100)),
    "dinov2": Protocol("dinov2", (504, 504), None, None),
}
DEFAULT_PROTOCOL = "franca"


@dataclass(frozen=True)
class HeadSettings:
    """How the linear head is trained (module docstring)."""

    n_last_blocks: int = 1
    epochs: int = 10
    train_batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer_name: str = "adamw"


def make_protocol(name: str, input_size: tuple[int, int] | None = None) -> Protocol:
    """The named protocol, optionally at another input size (dinov2 trains on masks at the input size). A fixed mask
    size is capped at the input size: a small model (say 64 px) is scored on 64×64 masks, not on masks upsampled
    to 100×100, which would only repeat pixels of the resized masks."""
    if name not in PROTOCOLS:
        raise ValueError(f"protocol {name!r} is unknown; choose one of {', '.join(PROTOCOLS)}")
    base = PROTOCOLS[name]
    size = tuple(input_size) if input_size is not None else base.input_size

    def capped(mask_size: tuple[int, int] | None) -> tuple[int, int] | None:
        return None if mask_size is None else tuple(min(m, s) for m, s in zip(mask_size, size, strict=True))

    return Protocol(base.name, size, capped(base.train_mask_size) or size, capped(base.eval_mask_size))


class LinearSegmentationHead(nn.Module):
    """BatchNorm2d + 1×1 convolution: [B, D, h, w] features → [B, C, h, w] logits."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_dim)
        self.classifier = nn.Conv2d(in_dim, num_classes, kernel_size=1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(features))


@torch.no_grad()
def precompute_train_features(
    backbone: nn.Module,
    dataset: Dataset,
    protocol: Protocol,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    use_rasa_head: bool = False,
    n_last_blocks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, D', h, w] (fp16, CPU) and masks [N, H_m, W_m] (uint8, 255 = ignore) at the train mask size."""
    paired = PairedTransformDataset(dataset, SegmentationTransform(protocol.input_size, protocol.train_mask_size))
    features, masks = [], []
    for dense, batch_masks in iterate_dense_batches(
        backbone, paired, batch_size, device, "train features", num_workers, use_rasa_head, n_last_blocks
    ):
        features.append(dense.permute(0, 3, 1, 2).half().cpu())
        masks.append(torch.stack(batch_masks).to(torch.uint8))
    return torch.cat(features), torch.cat(masks)


def upsampled_logits(head: nn.Module, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(head(features), size=size, mode="bilinear", align_corners=False)


def train_linear_head(
    features: torch.Tensor,
    masks: torch.Tensor,
    num_classes: int,
    epochs: int = 10,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    optimizer_name: str = "adamw",
    device: torch.device | None = None,
    seed: int = 0,
) -> tuple[LinearSegmentationHead, float]:
    """Trains the head on precomputed features; returns it (eval mode) and the last epoch's mean loss."""
    device = device or default_device()
    torch.manual_seed(seed)
    head = LinearSegmentationHead(features.shape[1], num_classes).to(device)
    if optimizer_name == "adamw":
        optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    elif optimizer_name == "sgd":
        optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer {optimizer_name!r} is unknown; choose adamw or sgd")
    steps_per_epoch = math.ceil(len(features) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    progress = Progress("linear head", epochs)
    mask_size = tuple(masks.shape[-2:])
    epoch_loss = float("nan")
    head.train()
    for epoch in range(epochs):
        total, count = 0.0, 0
        for batch in torch.randperm(len(features), generator=generator).split(batch_size):
            x = features[batch].to(device, torch.float32, non_blocking=True)
            y = masks[batch].to(device).long()
            loss = F.cross_entropy(upsampled_logits(head, x, mask_size), y, ignore_index=IGNORE_INDEX)
            if not torch.isfinite(loss):
                if (y == IGNORE_INDEX).all():
                    continue
                raise FloatingPointError(f"linear segmentation loss is {loss.item()} at epoch {epoch}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total, count = total + loss.item() * len(batch), count + len(batch)
        epoch_loss = total / max(count, 1)
        progress.print(epoch + 1, f"loss {epoch_loss:.4f} lr {scheduler.get_last_lr()[0]:.2e}")
    return head.eval(), epoch_loss


@torch.no_grad()
def evaluate_linear_head(
    backbone: nn.Module,
    head: nn.Module,
    dataset: Dataset,
    protocol: Protocol,
    num_classes: int,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    use_rasa_head: bool = False,
    n_last_blocks: int = 1,
) -> dict:
    """mIoU and pixel accuracy of the head's predictions at the protocol's evaluation mask size."""
    paired = PairedTransformDataset(dataset, SegmentationTransform(protocol.input_size, protocol.eval_mask_size))
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for dense, masks in iterate_dense_batches(
        backbone, paired, batch_size, device, "val", num_workers, use_rasa_head, n_last_blocks
    ):
        features = dense.permute(0, 3, 1, 2)
        for image_features, mask in zip(features, masks):
            prediction = upsampled_logits(head, image_features[None], tuple(mask.shape))[0].argmax(0)
            confusion += confusion_matrix(prediction.cpu(), mask, num_classes)
    return segmentation_metrics(confusion)


def run_linear_segmentation(
    backbone: nn.Module,
    train_dataset: Dataset,
    val_dataset: Dataset,
    num_classes: int,
    settings: common.EvalSettings,
    protocol_name: str = DEFAULT_PROTOCOL,
    head_settings: HeadSettings = HeadSettings(),
    device: torch.device | None = None,
) -> dict:
    """Features of ``train_dataset`` → trained head → metrics on ``val_dataset``, with the settings used. The
    protocol's mask sizes apply at ``settings.image_size``."""
    device = device or default_device()
    protocol = make_protocol(protocol_name, settings.image_size)
    check_input_size(protocol.input_size, backbone.patch_size)
    loader = (settings.batch_size, device, settings.num_workers, settings.use_rasa_head, head_settings.n_last_blocks)
    start = time.perf_counter()
    features, masks = precompute_train_features(backbone, train_dataset, protocol, *loader)
    head, last_loss = train_linear_head(
        features, masks, num_classes, head_settings.epochs, head_settings.train_batch_size, head_settings.lr,
        head_settings.weight_decay, head_settings.optimizer_name, device, settings.seed,
    )  # fmt: skip
    metrics = evaluate_linear_head(backbone, head, val_dataset, protocol, num_classes, *loader)
    used = {
        "protocol": {key: list(v) if isinstance(v, tuple) else v for key, v in asdict(protocol).items()},
        "num_classes": num_classes,
        "n_last_blocks": head_settings.n_last_blocks,
        "feature_dim": features.shape[1],
        "epochs": head_settings.epochs,
        "train_batch_size": head_settings.train_batch_size,
        "optimizer": head_settings.optimizer_name,
        "lr": head_settings.lr,
        "weight_decay": head_settings.weight_decay,
        "final_train_loss": last_loss,
        "total_seconds": time.perf_counter() - start,
    }
    return {**used, **metrics}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "franca.eval.linear_seg", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    protocol_sizes = {name: protocol.input_size for name, protocol in PROTOCOLS.items()}
    common.add_eval_arguments(p, batch_size=32, old_size_names=("--input-size",), protocols=protocol_sizes)
    p.add_argument("--train-dataset", required=True, help="e.g. ADE20K:root=R:split=training")
    p.add_argument("--val-dataset", required=True, help="e.g. ADE20K:root=R:split=validation")
    p.add_argument("--n-last-blocks", type=int, default=1, help="concatenate the patch tokens of the last n blocks")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-batch-size", type=int, default=16, help="images per optimisation step")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--num-classes", type=int, default=None, help="default: from the dataset")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_eval_args(get_args_parser(), argv)
    from franca.data.loaders import make_dataset

    backbone = common.load_backbone_for_eval(args.weights, args.rasa_weights)
    settings = common.eval_settings(args, backbone, {name: p.input_size for name, p in PROTOCOLS.items()})
    train_dataset = make_dataset(args.train_dataset, decoding=settings.decoding)
    val_dataset = make_dataset(args.val_dataset, decoding=settings.decoding)
    num_classes = dataset_num_classes(train_dataset, args.num_classes)
    head_settings = HeadSettings(
        args.n_last_blocks, args.epochs, args.train_batch_size, args.lr, args.weight_decay, args.optimizer
    )
    protocol_name = args.protocol or DEFAULT_PROTOCOL
    results = run_linear_segmentation(
        backbone, train_dataset, val_dataset, num_classes, settings, protocol_name, head_settings, default_device()
    )
    record = {
        "weights": args.weights,
        "rasa_weights": args.rasa_weights,
        "train_dataset": args.train_dataset,
        "val_dataset": args.val_dataset,
        "ignore_index": IGNORE_INDEX,
        "class_names": getattr(train_dataset, "classes", None),
        **results,
    }
    datasets = {"train": args.train_dataset, "val": args.val_dataset}
    mask_sizes = {key: results["protocol"][key] for key in ("train_mask_size", "eval_mask_size")}
    common.write_results(
        args.output_dir, "linear_seg", record, common.run_metadata(args, settings, datasets, mask_sizes)
    )
    print(f"linear_seg ({protocol_name}): mIoU {results['mIoU']:.2f}  pixel accuracy {results['pixel_accuracy']:.2f}")
    return record


if __name__ == "__main__":
    main()
