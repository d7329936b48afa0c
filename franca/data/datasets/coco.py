"""``COCO``: the images of a COCO 2017 split, unlabelled (RASA trains on images only; valeoai/Franca
``rasa/data/``).

Dataset string: ``COCO:root=R:split=train2017|val2017``, where ``R`` holds the extracted ``train2017/`` and
``val2017/`` image folders. Targets are -1; annotations are not read.
"""

from typing import Callable

from franca.data.datasets.base import FileListDataset
from franca.data.datasets.files import require_directory
from franca.data.datasets.folder_scan import scan_image_files
from franca.data.datasets.registry import register_dataset

SPLITS = ("train2017", "val2017")


class COCOImages(FileListDataset):
    """All images of ``root/<split>/`` (sorted file names), each with target -1."""

    def __init__(
        self, root: str, split: str, transform: Callable | None = None, target_transform: Callable | None = None
    ):
        if split not in SPLITS:
            raise ValueError(f"COCO split={split!r} is unknown; choose one of {', '.join(SPLITS)}")
        require_directory(root, "COCO root")
        directory = require_directory(f"{root}/{split}", f"COCO split folder {split!r} under root")
        paths = scan_image_files(directory, what="COCO")
        if not paths:
            raise FileNotFoundError(
                f"COCO split folder {str(directory)!r} holds no images; extract {split}.zip into {root!r}"
            )
        super().__init__(root, directory, paths, None, transform, target_transform)


def _make_coco(split: str, root: str, **kwargs) -> COCOImages:
    return COCOImages(root=root, split=split, **kwargs)


register_dataset("COCO", _make_coco, keys=("root", "split"), required_keys=("root", "split"))
