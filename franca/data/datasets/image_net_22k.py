"""``ImageNet22k``: ImageNet-21k stored as one uncompressed ``<wnid>.tar`` per class under ``root`` (as valeoai/Franca
``ImageNet22k``).

The index (class, byte offset and size of every regular member) is built by reading the tar headers with
``tarfile``; no ``extra`` metadata or per-class block logs are needed. When ``extra`` is given the index is cached
there as ``franca-imagenet22k-index.npz``. Offsets are 64-bit (the original's uint32 offsets overflow past 4 GiB;
docs/deviations.md, "ImageNet-21k"). Images are read by seeking to their offset; gzip-compressed members (a few in the
winter-2021 release) are decompressed. Class index = position of the tar in sorted order.
"""

import gzip
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from franca.data.datasets.base import ImageDataset
from franca.data.datasets.files import load_or_build_index, require_directory

GZIP_MAGIC = b"\x1f\x8b"


def _scan_tars(root: Path) -> dict[str, np.ndarray]:
    tar_paths = sorted(path for path in root.glob("*.tar") if path.is_file())
    if not tar_paths:
        raise FileNotFoundError(f"ImageNet22k found no <wnid>.tar files in {str(root)!r}")
    class_indices, offsets, sizes, names = [], [], [], []
    for class_index, tar_path in enumerate(tar_paths):
        with tarfile.open(tar_path, mode="r:") as archive:
            for member in archive:
                if member.isfile():
                    class_indices.append(class_index)
                    offsets.append(member.offset_data)
                    sizes.append(member.size)
                    names.append(member.name)
    if not names:
        raise FileNotFoundError(f"ImageNet22k: the tar files in {str(root)!r} contain no files")
    return {
        "class_ids": np.array([path.stem for path in tar_paths], dtype=str),
        "class_indices": np.array(class_indices, dtype=np.int32),
        "offsets": np.array(offsets, dtype=np.int64),
        "sizes": np.array(sizes, dtype=np.int64),
        "names": np.array(names, dtype=str),
    }


class ImageNet22k(ImageDataset):
    """All members of ``root/<wnid>.tar``; target = index of the wnid in sorted order."""

    def __init__(
        self,
        root: str,
        extra: str | None = None,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
    ):
        super().__init__(root, transform, target_transform)
        directory = require_directory(root, "ImageNet22k root")
        index = load_or_build_index(extra, "franca-imagenet22k-index.npz", lambda: _scan_tars(directory))
        self._directory = directory
        self.class_ids = [str(class_id) for class_id in index["class_ids"]]
        self._class_indices = index["class_indices"]
        self._offsets = index["offsets"]
        self._sizes = index["sizes"]
        self._names = index["names"]

    def __len__(self) -> int:
        return len(self._offsets)

    def _tar_path(self, index: int) -> Path:
        return self._directory / f"{self.class_ids[self._class_indices[index]]}.tar"

    def read_image(self, index: int) -> Image.Image:
        with open(self._tar_path(index), "rb") as archive:
            archive.seek(int(self._offsets[index]))
            data = archive.read(int(self._sizes[index]))
        if data.startswith(GZIP_MAGIC):
            data = gzip.decompress(data)
        return self.decode(data)

    def get_target(self, index: int) -> int:
        return int(self._class_indices[index])

    def describe(self, index: int) -> str:
        return f"{self._tar_path(index)}:{self._names[index]}"
