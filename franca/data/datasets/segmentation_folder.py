"""Semantic-segmentation datasets: (RGB PIL image, label mask) pairs, and ``SegFolder`` for a user's own data.

``SegFolder:root=R:split=S`` reads ``R/S/images/<stem>.{jpg,png,...}`` with ``R/S/masks/<stem>.png`` (single-channel
label PNGs: value = class index, 255 = ignore). The number of classes is the number of lines of ``R/classes.txt``
(or ``R/S/classes.txt``), one class name a line; without one it is 1 + the largest label below 255 over the masks of
every split under ``R``, so train and val agree.

Targets are int64 tensors [H, W] at the image's size. An unreadable image is skipped as in
:mod:`franca.data.datasets.base` (the next readable image is used, with its own mask); an unreadable or mismatched
mask is an error naming the file, since a silently replaced label would corrupt the metrics.
"""

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from franca.data.datasets.base import IGNORE_INDEX, ImageDataset
from franca.data.datasets.files import require_directory
from franca.data.datasets.folder_scan import image_paths_in
from franca.data.datasets.registry import register_dataset

LABEL_MODES = ("L", "P", "I", "I;16")


def decode_mask(path: Path) -> np.ndarray:
    """A label PNG as an integer array [H, W] (palette PNGs give their indices, not colours)."""
    with Image.open(path) as mask:
        if mask.mode not in LABEL_MODES:
            raise ValueError(
                f"segmentation mask {str(path)!r} has mode {mask.mode}; it must be a single-channel label image "
                "(mode L or P) whose pixel values are class indices, 255 = ignore"
            )
        return np.array(mask)


class SegmentationDataset(ImageDataset):
    """Pairs of image and mask files; subclasses list them and may remap mask values with :meth:`remap_mask`."""

    def __init__(
        self,
        root: str,
        image_paths: list[Path],
        mask_paths: list[Path],
        transform: Callable | None = None,
        target_transform: Callable | None = None,
    ):
        super().__init__(root, transform, target_transform)
        if not image_paths:
            raise FileNotFoundError(f"{type(self).__name__} found no images at root {root!r}")
        self._image_paths = [str(path) for path in image_paths]
        self._mask_paths = [str(path) for path in mask_paths]

    def __len__(self) -> int:
        return len(self._image_paths)

    def read_image(self, index: int) -> Image.Image:
        return self.decode(self._image_paths[index])

    def remap_mask(self, mask: np.ndarray) -> np.ndarray:
        """Dataset-specific label mapping; identity here."""
        return mask

    def get_target(self, index: int) -> torch.Tensor:
        path = Path(self._mask_paths[index])
        if not path.is_file():
            raise FileNotFoundError(f"mask {str(path)!r} of image {self._image_paths[index]!r} does not exist")
        mask = self.remap_mask(decode_mask(path))
        with Image.open(self._image_paths[index]) as image:
            if image.size != (mask.shape[1], mask.shape[0]):
                raise ValueError(
                    f"mask {str(path)!r} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                    f"{image.size[0]}x{image.size[1]}; masks must have the size of their image"
                )
        return torch.from_numpy(mask.astype(np.int64))

    def describe(self, index: int) -> str:
        return self._image_paths[index]


def _read_class_names(root: Path, split: str) -> list[str] | None:
    for candidate in (root / "classes.txt", root / split / "classes.txt"):
        if candidate.is_file():
            return [line.strip() for line in candidate.read_text().splitlines() if line.strip()]
    return None


def _largest_label(root: Path) -> int:
    largest = -1
    for mask_path in sorted(root.glob("*/masks/*.png")):
        labels = np.unique(decode_mask(mask_path))
        labels = labels[labels != IGNORE_INDEX]
        if labels.size:
            largest = max(largest, int(labels.max()))
    return largest


class SegFolder(SegmentationDataset):
    """``root/split/images`` + ``root/split/masks`` (same stems); see the module docstring."""

    def __init__(
        self, root: str, split: str, transform: Callable | None = None, target_transform: Callable | None = None
    ):
        directory = require_directory(root, "SegFolder root")
        images_dir = require_directory(directory / split / "images", f"SegFolder split {split!r} images")
        masks_dir = require_directory(directory / split / "masks", f"SegFolder split {split!r} masks")
        image_paths = image_paths_in(images_dir, f"SegFolder split {split!r} images")
        mask_paths = [masks_dir / f"{path.stem}.png" for path in image_paths]
        missing = [str(path) for path in mask_paths if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"SegFolder: {len(missing)} image(s) of {str(images_dir)!r} have no mask in {str(masks_dir)!r} "
                f"(e.g. {missing[0]!r}); every image needs a <stem>.png mask"
            )
        super().__init__(str(directory), image_paths, mask_paths, transform, target_transform)
        self.split = split
        self.classes = _read_class_names(directory, split)
        self._num_classes = len(self.classes) if self.classes is not None else None

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            largest = _largest_label(Path(self.root))
            if largest < 0:
                raise ValueError(f"SegFolder at {self.root!r}: every mask is 255 (ignore); add a classes.txt")
            self._num_classes = largest + 1
        return self._num_classes


register_dataset("SegFolder", SegFolder, keys=("root", "split"), required_keys=("root", "split"))
