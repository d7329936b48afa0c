"""``COCO``: the images of a COCO 2017 split, unlabelled (RASA trains on images only; reference §8.2 step 6).

Dataset string: ``COCO:root=R:split=train2017|val2017``, where ``R`` holds the extracted ``train2017/`` and
``val2017/`` image folders. Targets are -1; annotations are not read.
"""

from typing import Callable

import numpy as np
from PIL import Image

from franca.data.datasets.base import ImageDataset
from franca.data.datasets.files import require_directory, scan_image_files
from franca.data.datasets.registry import register_dataset

SPLITS = ("train2017", "val2017")


class COCOImages(ImageDataset):
    """All images of ``root/<split>/`` (sorted file names), each with target -1."""

    def __init__(
        self, root: str, split: str, transform: Callable | None = None, target_transform: Callable | None = None
    ):
        super().__init__(root, transform, target_transform)
        if split not in SPLITS:
            raise ValueError(f"COCO split={split!r} is unknown; choose one of {', '.join(SPLITS)}")
        require_directory(root, "COCO root")
        self._directory = require_directory(f"{root}/{split}", f"COCO split folder {split!r} under root")
        self._paths = np.array(scan_image_files(self._directory))
        if len(self._paths) == 0:
            raise FileNotFoundError(
                f"COCO split folder {str(self._directory)!r} holds no images; extract {split}.zip into {root!r}"
            )

    def __len__(self) -> int:
        return len(self._paths)

    def read_image(self, index: int) -> Image.Image:
        return self.decode(self._directory / str(self._paths[index]))

    def get_target(self, index: int) -> int:
        return -1

    def describe(self, index: int) -> str:
        return str(self._directory / str(self._paths[index]))


def _make_coco(split: str, root: str, **kwargs) -> COCOImages:
    return COCOImages(root=root, split=split, **kwargs)


register_dataset("COCO", _make_coco, keys=("root", "split"), required_keys=("root", "split"))
