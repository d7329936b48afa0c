"""``ImageNet``: ImageNet-1k in its usual folder layout (as valeoai/Franca ``ImageNet``).

Layout: ``root/train/<wnid>/*.JPEG``, ``root/val/<wnid>/*.JPEG``, ``root/test/*.JPEG`` and optionally
``root/labels.txt`` (CSV ``wnid,class name`` per line). Unlike the original, no prepared ``extra/entries-*.npy``
metadata is needed: the file index is built by scanning the split folder. When ``extra`` is given the index is cached
there as ``franca-imagenet-<split>-index.npz`` and read back on later runs (delete it after changing the data).
Class indices follow the sorted wnids of ``root/train`` (of the split folder when there is no train folder), so train
and val labels agree. The sample counts are not asserted, so subsets work.
"""

from pathlib import Path
from typing import Callable

import numpy as np

from franca.data.datasets.base import FileListDataset
from franca.data.datasets.files import load_or_build_index, require_directory
from franca.data.datasets.folder_scan import ScanReport, scan_image_files

SPLIT_FOLDERS = {"TRAIN": "train", "VAL": "val", "TEST": "test"}


def _class_ids(root: Path, split_folder: str) -> list[str]:
    reference = root / "train" if (root / "train").is_dir() else root / split_folder
    return sorted(entry.name for entry in reference.iterdir() if entry.is_dir()) if reference.is_dir() else []


def _scan_split(root: Path, split: str) -> dict[str, np.ndarray]:
    folder = SPLIT_FOLDERS[split]
    class_ids = _class_ids(root, folder)
    paths, targets = [], []
    report = ScanReport()
    if split == "TEST":
        paths = [f"{folder}/{path}" for path in scan_image_files(root / folder, report=report)]
        targets = [-1] * len(paths)
    else:
        class_index = {class_id: index for index, class_id in enumerate(class_ids)}
        for class_dir in sorted(entry for entry in (root / folder).iterdir() if entry.is_dir()):
            if class_dir.name not in class_index:
                raise ValueError(
                    f"ImageNet {split} class folder {str(class_dir)!r} has no counterpart in {str(root / 'train')!r}; "
                    "every val class must also be a train class"
                )
            files = [f"{folder}/{class_dir.name}/{path}" for path in scan_image_files(class_dir, report=report)]
            paths += files
            targets += [class_index[class_dir.name]] * len(files)
    report.warn(f"ImageNet {split}", root / folder, len(paths))
    if not paths:
        raise FileNotFoundError(
            f"ImageNet {split} found no images in {str(root / folder)!r}; expected "
            f"{folder}/{'<wnid>/' if split != 'TEST' else ''}*.JPEG below the root"
        )
    return {
        "paths": np.array(paths),
        "targets": np.array(targets, dtype=np.int64),
        "class_ids": np.array(class_ids, dtype=str),
    }


def _read_class_names(root: Path, class_ids: list[str]) -> list[str]:
    labels_file = root / "labels.txt"
    if not labels_file.is_file():
        return list(class_ids)
    names = {}
    for line in labels_file.read_text().splitlines():
        class_id, _, name = line.partition(",")
        names[class_id.strip()] = name.strip()
    return [names.get(class_id, class_id) for class_id in class_ids]


class ImageNet(FileListDataset):
    """ImageNet-1k split ``TRAIN``, ``VAL`` or ``TEST`` (case-insensitive); TEST images have target -1."""

    def __init__(
        self,
        split: str,
        root: str,
        extra: str | None = None,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
    ):
        self.split = str(split).upper()
        if self.split not in SPLIT_FOLDERS:
            raise ValueError(f"ImageNet split={split!r} is unknown; choose one of {', '.join(SPLIT_FOLDERS)}")
        directory = require_directory(root, "ImageNet root")
        require_directory(directory / SPLIT_FOLDERS[self.split], f"ImageNet {self.split} split folder")
        index = load_or_build_index(
            extra, f"franca-imagenet-{self.split.lower()}-index.npz", lambda: _scan_split(directory, self.split)
        )
        super().__init__(root, directory, index["paths"], index["targets"], transform, target_transform)
        self.class_ids = [str(class_id) for class_id in index["class_ids"]]
        self.class_names = _read_class_names(directory, self.class_ids)
