"""Shared parts of the dense evaluations (HummingBird, linear segmentation, PCA pictures).

- Metrics: a confusion matrix accumulated over a whole split; mIoU averages the per-class IoU over the classes that
  occur in the ground truth or the prediction (a class absent from both has no defined IoU and is left out, the usual
  convention of mmseg and the open HummingBird code); pixel accuracy is the share of labelled pixels predicted right.
  Pixels labelled ``ignore_index`` (255) count nowhere.
- Masks: nearest-neighbour resizing (labels must not be blended) and per-patch label distributions.
- Data: (image, mask) datasets with a joint transform (resize or augment both the same way), a collate that keeps
  masks of different sizes, and batched dense feature extraction with a progress line (bf16 autocast on GPU).
"""

import sys
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from franca.data.augmentations import IMAGENET_MEAN, IMAGENET_STD
from franca.data.datasets.base import IGNORE_INDEX
from franca.data.seeded_transform import seeded_global_rngs
from franca.utils.logging import Progress


# --------------------------------------------------------------------------------------------------------- metrics
def confusion_matrix(
    prediction: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """[C, C] int64 counts, rows = ground-truth class, columns = predicted class, over pixels whose target is not
    ``ignore_index``. Targets outside [0, C) other than ``ignore_index`` are an error (a wrong ``num_classes``)."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(prediction.shape)} differs from target shape {tuple(target.shape)}")
    target = target.reshape(-1).long()
    prediction = prediction.reshape(-1).long().to(target.device)
    valid = target != ignore_index
    target, prediction = target[valid], prediction[valid]
    bad = (target < 0) | (target >= num_classes)
    if bad.any():
        raise ValueError(
            f"mask labels {sorted(target[bad].unique().tolist())[:10]} are outside [0, {num_classes}) and are not the "
            f"ignore label {ignore_index}; pass the dataset's real number of classes (--num-classes)"
        )
    if ((prediction < 0) | (prediction >= num_classes)).any():
        raise ValueError(f"predicted classes must lie in [0, {num_classes})")
    counts = torch.bincount(target * num_classes + prediction, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu()


def per_class_iou(confusion: torch.Tensor) -> torch.Tensor:
    """IoU_c = TP / (TP + FP + FN) per class (float64); NaN for a class in neither ground truth nor prediction."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    return torch.where(union > 0, true_positive / union.clamp_min(1), torch.full_like(union, float("nan")))


def segmentation_metrics(confusion: torch.Tensor) -> dict[str, Any]:
    """mIoU (over classes present in ground truth or prediction) and pixel accuracy, both in percent."""
    iou = per_class_iou(confusion)
    present = ~iou.isnan()
    total = confusion.sum().item()
    return {
        "mIoU": 100.0 * iou[present].mean().item() if present.any() else float("nan"),
        "pixel_accuracy": 100.0 * confusion.diag().sum().item() / total if total else float("nan"),
        "per_class_IoU": [None if v != v else 100.0 * v for v in iou.tolist()],
        "num_classes_evaluated": int(present.sum()),
        "num_pixels": int(total),
    }


# ----------------------------------------------------------------------------------------------------------- masks
def resize_mask_nearest(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Label mask [..., H, W] → [..., h, w] by nearest neighbour (source index floor(i · H / h)); dtype kept."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    lead = mask.shape[:-2]
    flat = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    return F.interpolate(flat, size=size, mode="nearest").reshape(*lead, *size).to(mask.dtype)


def patch_label_distribution(
    mask: torch.Tensor, patch_size: int, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Share of each class among the labelled pixels of each patch: [B, H, W] masks → [B, H/p, W/p, C] float32.

    Rows sum to 1, or to 0 for a patch whose pixels are all ``ignore_index``. This is the soft patch label of the
    HummingBird memory (Balažević et al. 2023; the open implementation averages one-hot pixel labels per patch).
    """
    b, h, w = mask.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"mask size {h}x{w} is not divisible by the patch size {patch_size}")
    gh, gw = h // patch_size, w // patch_size
    rows = torch.arange(h, device=mask.device) // patch_size
    cols = torch.arange(w, device=mask.device) // patch_size
    patch_index = (torch.arange(b, device=mask.device)[:, None, None] * gh + rows[:, None]) * gw + cols
    mask = mask.long()
    valid = mask != ignore_index
    if (mask[valid] >= num_classes).any() or (mask[valid] < 0).any():
        raise ValueError(f"mask labels must lie in [0, {num_classes}) or be the ignore label {ignore_index}")
    flat = patch_index[valid] * num_classes + mask[valid]
    counts = torch.bincount(flat, minlength=b * gh * gw * num_classes).float().reshape(b, gh, gw, num_classes)
    return counts / counts.sum(-1, keepdim=True).clamp_min(1)


# ----------------------------------------------------------------------------------------------------------- data
class SegmentationTransform:
    """Joint transform of a (PIL image, [H, W] mask: tensor, array or PIL "L") pair: image → normalised float
    [3, S_h, S_w]; mask → int64.

    ``augment=False``: image resized (bilinear, antialiased) to ``image_size``; the mask to ``mask_size`` by nearest
    neighbour, or kept at its original size when ``mask_size`` is None. ``augment=True`` (the open HummingBird train
    augmentation): a RandomResizedCrop of both with scale (0.5, 2.0) and brightness / contrast / saturation / hue
    jitter of 0.1, each with probability 0.5, on the image.
    """

    def __init__(
        self,
        image_size: tuple[int, int],
        mask_size: tuple[int, int] | None = None,
        augment: bool = False,
        crop_scale: tuple[float, float] = (0.5, 2.0),
    ):
        self.image_size, self.mask_size = tuple(image_size), mask_size
        if augment:
            geometry = [v2.RandomResizedCrop(self.image_size, scale=crop_scale, antialias=True)]
            colour = [
                v2.RandomApply([v2.ColorJitter(**{name: 0.1})], p=0.5)
                for name in ("brightness", "contrast", "saturation", "hue")
            ]
            self.joint = v2.Compose([*geometry, *colour])
        else:
            self.joint = None
            self.resize_image = v2.Resize(self.image_size, antialias=True)
        self.to_tensor = v2.Compose(
            [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        )

    def __call__(self, image, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(np.array(mask))
        mask = tv_tensors.Mask(mask.to(torch.int64))
        if self.joint is not None:
            image, mask = self.joint(v2.ToImage()(image), mask)
        else:
            image = self.resize_image(v2.ToImage()(image))
        mask = mask.as_subclass(torch.Tensor)
        if self.mask_size is not None:
            mask = resize_mask_nearest(mask, self.mask_size)
        return self.to_tensor(image).as_subclass(torch.Tensor), mask


class PairedTransformDataset(Dataset):
    """``transform(image, mask)`` of a raw (image, mask) dataset, under RNGs seeded by (seed, epoch, index), so
    augmented memory banks are reproducible."""

    def __init__(self, dataset: Dataset, transform: Callable, seed: int = 0, epoch: int = 0):
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with seeded_global_rngs([self.seed, self.epoch, index]):
            image, mask = self.dataset[index]
            return self.transform(image, mask)


def collate_images_and_masks(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, list]:
    """Stacks the images; keeps the masks as a list (their sizes may differ)."""
    return torch.stack([image for image, _ in batch]), [mask for _, mask in batch]


def dataset_num_classes(dataset: Dataset, override: int | None = None) -> int:
    """``override``, else the dataset's ``num_classes`` attribute, else its module's ``NUM_CLASSES``."""
    if override is not None:
        return override
    found = getattr(dataset, "num_classes", None) or getattr(sys.modules[type(dataset).__module__], "NUM_CLASSES", None)
    if found is None:
        raise ValueError(
            f"cannot tell the number of classes of {type(dataset).__name__} (no num_classes attribute); "
            "pass --num-classes"
        )
    return int(found)


# ------------------------------------------------------------------------------------------------------- features
def check_input_size(size: tuple[int, int], patch_size: int) -> None:
    if size[0] % patch_size or size[1] % patch_size:
        raise ValueError(
            f"input size {size[0]}x{size[1]} is not divisible by the backbone's patch size {patch_size}; "
            f"use a multiple of {patch_size} (e.g. {patch_size * round(size[0] / patch_size)})"
        )


@torch.no_grad()
def dense_features(
    backbone: nn.Module, images: torch.Tensor, use_rasa_head: bool = False, n_last_blocks: int = 1
) -> torch.Tensor:
    """Patch features [B, H/p, W/p, D'] (fp32): the final normed patch tokens (D' = D), the RASA-debiased ones
    (``patch_token_rasa``), or the normed patch tokens of the last ``n_last_blocks`` blocks concatenated
    (D' = n·D, DINOv2's "+ms"-free multi-layer linear head input)."""
    b, _, h, w = images.shape
    grid = (h // backbone.patch_size, w // backbone.patch_size)
    if use_rasa_head and n_last_blocks != 1:
        raise ValueError(
            f"RASA-debiased features exist for the last block only; use n_last_blocks=1, not {n_last_blocks}"
        )
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.device.type == "cuda"):
        if n_last_blocks > 1:
            tokens = torch.cat(backbone.get_intermediate_layers(images, n=n_last_blocks, norm=True), dim=-1)
        else:
            out = backbone.forward_features(images, use_rasa_head=use_rasa_head)
            tokens = out["patch_token_rasa" if use_rasa_head else "x_norm_patchtokens"]
    return tokens.float().reshape(b, *grid, -1)


def iterate_dense_batches(
    backbone: nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    name: str,
    num_workers: int = 0,
    use_rasa_head: bool = False,
    n_last_blocks: int = 1,
    log_every_s: float = 10.0,
) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Yields (dense features [B, h, w, D'] on ``device``, masks) batch by batch with an ETA progress line."""
    backbone = backbone.to(device).eval()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_images_and_masks,
        pin_memory=device.type == "cuda",
    )
    progress = Progress(name, len(dataset))
    last, done = time.perf_counter(), 0
    for images, masks in loader:
        yield dense_features(backbone, images.to(device, non_blocking=True), use_rasa_head, n_last_blocks), masks
        done += len(images)
        if time.perf_counter() - last > log_every_s or done == len(dataset):
            progress.print(done)
            last = time.perf_counter()


def parse_size(values: list[int]) -> tuple[int, int]:
    """``[S]`` → (S, S); ``[H, W]`` → (H, W)."""
    if len(values) not in (1, 2):
        raise ValueError(f"a size is one number (square) or two (height width), got {values}")
    return (values[0], values[-1])
