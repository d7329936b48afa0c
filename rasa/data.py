"""Data for RASA: the training augmentation (as valeoai/Franca ``rasa/``), seeded batches, evaluation transforms and the
position targets of the patch grid."""

import math
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import Dataset
from torchvision.transforms import v2

from franca.data.augmentations import make_normalize_transform
from franca.data.seeded_transform import seeded_global_rngs


class PILGaussianBlur:
    """PIL's Gaussian blur with radius σ ~ U(σ_min, σ_max), σ drawn from torch's RNG (the original blurs with PIL)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        radius = torch.empty(1).uniform_(self.sigma[0], self.sigma[1]).item()
        return image.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


def make_rasa_train_transform(image_size: int, scale: Sequence[float] = (0.25, 1.0)) -> v2.Compose:
    """PIL image → normalised [3, S, S] tensor with the original's heavy geometric augmentation.

    RandomResizedCrop(scale) → colour jitter (0.32, 0.32, 0.32, 0.08) p 0.8 → grayscale p 0.2 → blur p 0.5 →
    horizontal and vertical flips → ±90° rotation (nearest, fill 0) p 0.5 → ImageNet normalisation (std 0.225 for
    blue, fixing the original's 0.255 typo; docs/deviations.md). The flips and rotations decorrelate image content
    from grid position, so position can only be read from what the backbone injects.
    """
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"RASA crop scale={tuple(scale)} must be (min, max) with 0 < min <= max <= 1")
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=tuple(scale), antialias=True),
            v2.RandomApply([v2.ColorJitter(brightness=0.32, contrast=0.32, saturation=0.32, hue=0.08)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([PILGaussianBlur((0.1, 2.0))], p=0.5),
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomVerticalFlip(p=0.5),
            v2.RandomApply([v2.RandomRotation(90, interpolation=v2.InterpolationMode.NEAREST, fill=0)], p=0.5),
            make_normalize_transform(),
        ]
    )


def make_rasa_eval_transform(image_size: int) -> v2.Compose:
    """PIL image → normalised [3, S, S] tensor (bilinear resize to a square, as the original's validation)."""
    return v2.Compose([v2.Resize((image_size, image_size), antialias=True), make_normalize_transform()])


class MaskToTensor:
    """A class mask (PIL image, array or tensor, as VOC, ADE20K and ``SegFolder`` give them) → int64 [S, S] tensor
    resized with nearest neighbour; other targets (class indices, none) → None."""

    def __init__(self, mask_size: int):
        self.mask_size = mask_size

    def __call__(self, target: Any) -> torch.Tensor | None:
        if isinstance(target, torch.Tensor):
            target = target.numpy()
        elif isinstance(target, Image.Image):
            target = np.asarray(target)
        if not isinstance(target, np.ndarray) or target.ndim != 2:
            return None
        mask = Image.fromarray(target.astype(np.int32))  # mode I, 32-bit: labels above 255 stay themselves
        mask = mask.resize((self.mask_size, self.mask_size), Image.Resampling.NEAREST)
        return torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())


def collate_images_and_masks(batch: list[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stacks images [B, 3, H, W]; masks [B, S, S] when every target is a mask tensor, else None."""
    images = torch.stack([image for image, _ in batch])
    targets = [target for _, target in batch]
    masks = torch.stack(targets) if all(isinstance(t, torch.Tensor) for t in targets) else None
    return images, masks


class SeededAugmentedImages(Dataset):
    """``dataset[(epoch, index)]`` → the augmented image only, under RNGs seeded by (seed, round, epoch, index).

    Any labels or masks are dropped, so RASA trains on any image dataset; the augmentation of a sample depends only
    on those four numbers, which makes a resumed run identical to an uninterrupted one.
    """

    def __init__(self, dataset: Dataset, transform: Any, seed: int, round_index: int):
        self.dataset, self.transform, self.seed, self.round_index = dataset, transform, seed, round_index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        epoch, index = key
        with seeded_global_rngs([self.seed, self.round_index, epoch, index]):
            image, _ = self.dataset[index]
            return self.transform(image)


def round_batches(num_samples: int, batch_size: int, epochs: int, seed: int, round_index: int) -> list[list[tuple]]:
    """Batches of (epoch, index) keys for one round: a fresh permutation per epoch, incomplete last batch dropped."""
    if num_samples < batch_size:
        raise ValueError(
            f"the RASA training dataset has {num_samples} images, fewer than train.batch_size={batch_size}; "
            "lower train.batch_size or use more images"
        )
    batches = []
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([seed, round_index, epoch]).generate_state(1)[0])
        )
        order = torch.randperm(num_samples, generator=generator).tolist()
        for start in range(0, num_samples - batch_size + 1, batch_size):
            batches.append([(epoch, index) for index in order[start : start + batch_size]])
    return batches


def grid_positions(rows: int, cols: int) -> torch.Tensor:
    """[rows·cols, 2] targets (row/(rows−1), col/(cols−1)) of the patch grid, row-major (as the original)."""
    if rows < 2 or cols < 2:
        raise ValueError(
            f"a {rows}×{cols} patch grid has no positions to regress; use images of at least 2 patches a side"
        )
    r, c = torch.meshgrid(torch.arange(rows) / (rows - 1), torch.arange(cols) / (cols - 1), indexing="ij")
    return torch.stack((r.reshape(-1), c.reshape(-1)), dim=1)


def square_grid_side(num_patches: int) -> int:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patch tokens do not form a square grid; RASA uses square images")
    return side
