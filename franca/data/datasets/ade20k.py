"""``ADE20K:root=R:split=training|validation``: the ADEChallengeData2016 scene-parsing benchmark (150 classes).

Layout: ``R/images/<split>/*.jpg`` and ``R/annotations/<split>/*.png`` (same stems). The annotation value 0 means
"other / unlabelled" and v in 1..150 the class v; masks are shifted to 0..149 with 0 → 255 (ignore), the usual
"reduce zero label" convention of mmseg and DINOv2's linear segmentation.
"""

from typing import Callable

import numpy as np

from franca.data.datasets.base import IGNORE_INDEX
from franca.data.datasets.files import require_directory
from franca.data.datasets.folder_scan import image_paths_in
from franca.data.datasets.registry import register_dataset
from franca.data.datasets.segmentation_folder import SegmentationDataset

NUM_CLASSES = 150
SPLITS = ("training", "validation")


class ADE20K(SegmentationDataset):
    """ADE20K images with their 150-class masks (255 = ignore)."""

    num_classes = NUM_CLASSES

    def __init__(
        self, root: str, split: str, transform: Callable | None = None, target_transform: Callable | None = None
    ):
        if split not in SPLITS:
            raise ValueError(f"ADE20K split={split!r} is not one of {', '.join(SPLITS)}")
        directory = require_directory(root, "ADE20K root (the ADEChallengeData2016 folder)")
        images_dir = require_directory(directory / "images" / split, f"ADE20K {split} images")
        masks_dir = require_directory(directory / "annotations" / split, f"ADE20K {split} annotations")
        image_paths = image_paths_in(images_dir, f"ADE20K {split} images", suffixes=(".jpg",))
        mask_paths = [masks_dir / f"{path.stem}.png" for path in image_paths]
        super().__init__(str(directory), image_paths, mask_paths, transform, target_transform)
        self.split = split

    def remap_mask(self, mask: np.ndarray) -> np.ndarray:
        mask = mask.astype(np.int64)
        return np.where(mask == 0, IGNORE_INDEX, mask - 1)


register_dataset("ADE20K", ADE20K, keys=("root", "split"), required_keys=("root", "split"))
