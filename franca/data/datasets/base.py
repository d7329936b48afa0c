"""The shared base of franca's image datasets: RGB decoding and the policy for unreadable images.

Decoding (transparency, 16/32-bit images) follows :mod:`franca.data.image_decoding`, with the options of the
dataset's :attr:`ImageDataset.image_decoding` (set by :func:`franca.data.loaders.make_dataset`).

Skip policy (design.md "Bad input gets a clear error"): a map dataset has a fixed length, so an unreadable image at
index ``i`` is replaced by the next readable one, ``i+1, i+2, ...`` (wrapping around), together with that image's
target. The substitution is deterministic, so data order and augmentations stay reproducible. Every failure emits an
:class:`UnreadableImageWarning` naming the file, and is counted in :attr:`ImageDataset.read_failures`, which the
main process and all DataLoader workers share. The failure rate is judged after every read once at least
``min(100, number of images)`` reads were attempted (100 for WebDataset streams, whose length is unknown): when more
than 1% of the reads attempted so far failed, reading stops with :class:`TooManyUnreadableImagesError` naming the
dataset root.
"""

import io
import os
import warnings
import zlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from franca.data.datasets.files import open_regular_file
from franca.data.image_decoding import DEFAULT_DECODING, ImageDecoding

# The label of unlabelled pixels in every segmentation mask (VOC, ADE20K, SegFolder) and in every eval metric.
IGNORE_INDEX = 255
MAX_FAILURE_FRACTION = 0.01
MIN_ATTEMPTS_BEFORE_CHECK = 100
READ_COUNTER_SLOTS = 1024
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zlib.error, Image.DecompressionBombError)


class UnreadableImageWarning(UserWarning):
    """An image could not be read and was replaced by the next readable one."""


class TooManyUnreadableImagesError(RuntimeError):
    """More than 1% of the attempted image reads of a dataset failed."""


class ReadFailureCounter:
    """Counts image reads and failures across the main process and DataLoader workers.

    Counts live in a shared-memory tensor with one row per process (row 0: main process, row 1 + k: worker k), so
    workers never write the same row and no lock is needed.
    """

    def __init__(self):
        self._counts = torch.zeros(READ_COUNTER_SLOTS, 2, dtype=torch.int64).share_memory_()

    @staticmethod
    def _slot() -> int:
        worker = get_worker_info()
        return 0 if worker is None else 1 + worker.id % (READ_COUNTER_SLOTS - 1)

    def record(self, failed: bool) -> None:
        row = self._counts[self._slot()]
        row[0] += 1
        if failed:
            row[1] += 1

    @property
    def attempted(self) -> int:
        return int(self._counts[:, 0].sum())

    @property
    def failed(self) -> int:
        return int(self._counts[:, 1].sum())


def decode_image(source: str | os.PathLike | bytes, decoding: ImageDecoding = DEFAULT_DECODING) -> Image.Image:
    """Fully decodes an image file (path or bytes) to 8-bit RGB by ``decoding`` (transparency composited, high bit
    depths scaled); decoding errors surface here, not later. A path is opened only if it is a regular file, and an
    image above the decode-size cap is refused from its header (both ``OSError`` / ``ValueError``, so skipped)."""
    with io.BytesIO(source) if isinstance(source, bytes) else open_regular_file(source) as stream:
        with decoding.open(stream) as image:
            return decoding.to_rgb(image)


class ImageDataset(Dataset, ABC):
    """A map dataset of (RGB PIL image, target) pairs; target is -1 for unlabelled images.

    Subclasses implement ``__len__``, :meth:`read_image`, :meth:`get_target` and :meth:`describe`; this class adds
    the transforms and the skip policy of the module docstring. Subclasses decode files with :meth:`decode`, which
    applies the dataset's :attr:`image_decoding`.
    """

    image_decoding: ImageDecoding = DEFAULT_DECODING

    def __init__(self, root: str, transform: Callable | None = None, target_transform: Callable | None = None):
        self.root = str(root)
        self.transform = transform
        self.target_transform = target_transform
        self.read_failures = ReadFailureCounter()

    def decode(self, source: str | os.PathLike | bytes) -> Image.Image:
        """An image file (path or bytes) decoded to RGB with this dataset's :attr:`image_decoding`."""
        return decode_image(source, self.image_decoding)

    @abstractmethod
    def __len__(self) -> int:
        """The number of images."""

    @abstractmethod
    def read_image(self, index: int) -> Image.Image:
        """The RGB image at ``index``; raises one of ``READ_ERRORS`` when it cannot be decoded."""

    @abstractmethod
    def get_target(self, index: int) -> int:
        """The integer label at ``index``, or -1 when the dataset has no labels."""

    @abstractmethod
    def describe(self, index: int) -> str:
        """Where the image at ``index`` comes from (a path or a tar member), for messages."""

    def _check_failure_rate(self) -> None:
        attempted, failed = self.read_failures.attempted, self.read_failures.failed
        if attempted >= min(MIN_ATTEMPTS_BEFORE_CHECK, len(self)) and failed > MAX_FAILURE_FRACTION * attempted:
            raise TooManyUnreadableImagesError(
                f"{failed} of {attempted} image reads failed (more than {MAX_FAILURE_FRACTION:.0%}) in "
                f"{type(self).__name__} at root {self.root!r}; check that the files are complete images (see the "
                "UnreadableImageWarning messages for their names) and repair or remove them"
            )

    def _read_first_readable(self, index: int) -> tuple[Image.Image, int]:
        size = len(self)
        for offset in range(size):
            candidate = (index + offset) % size
            try:
                image = self.read_image(candidate)
            except READ_ERRORS as error:
                self.read_failures.record(failed=True)
                warnings.warn(
                    f"skipping unreadable image {self.describe(candidate)} of {type(self).__name__} at "
                    f"{self.root!r} ({type(error).__name__}: {error}); using the next readable image instead",
                    UnreadableImageWarning,
                    stacklevel=2,
                )
                self._check_failure_rate()
                continue
            self.read_failures.record(failed=False)
            self._check_failure_rate()
            return image, candidate
        raise TooManyUnreadableImagesError(f"no image of {type(self).__name__} at root {self.root!r} is readable")

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {type(self).__name__} of length {len(self)}")
        image, used_index = self._read_first_readable(index % len(self))
        target = self.get_target(used_index)
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


class FileListDataset(ImageDataset):
    """Images listed as paths relative to one folder, each with an integer target (-1 when unlabelled).

    ``ImageFolder``, ``ImageNet`` and ``COCO`` differ only in how they find their files and labels; reading,
    targets and messages are shared here. Paths and targets are kept as NumPy arrays, so DataLoader workers share
    them copy-on-write instead of touching millions of Python objects.
    """

    def __init__(
        self,
        root: str,
        directory: Path,
        paths: Sequence[str] | np.ndarray,
        targets: Sequence[int] | np.ndarray | None = None,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
    ):
        super().__init__(root, transform, target_transform)
        self._directory = Path(directory)
        self._paths = np.asarray(paths)
        self._targets = np.full(len(self._paths), -1, dtype=np.int64) if targets is None else np.asarray(targets)
        if len(self._targets) != len(self._paths):
            raise ValueError(f"{type(self).__name__} got {len(self._paths)} paths but {len(self._targets)} targets")

    def __len__(self) -> int:
        return len(self._paths)

    def read_image(self, index: int) -> Image.Image:
        return self.decode(self.describe(index))

    def get_target(self, index: int) -> int:
        return int(self._targets[index])

    def describe(self, index: int) -> str:
        return str(self._directory / str(self._paths[index]))
