"""``VOC``: Pascal VOC 2012 segmentation, as (RGB image, class mask) pairs or images only (RASA training data,
as valeoai/Franca ``rasa/data/``).

Dataset string: ``VOC:root=R:split=train|trainaug|val|trainval[:masks=true|false]``, where ``R`` is the folder holding
``JPEGImages/`` (``VOCdevkit/VOC2012``). Image lists come from ``ImageSets/Segmentation/<split>.txt`` and masks from
``SegmentationClass/<id>.png``. ``trainaug`` is the usual SBD-augmented training set (10,582 images): the list
``ImageSets/Segmentation/trainaug.txt`` and the masks ``SegmentationClassAug/<id>.png``, both added to the VOC folder
by the user (they are not part of the VOC archive).

Targets: with ``masks=true`` (the default) a PIL ``"L"`` image of class indices 0…20 (:data:`NUM_CLASSES`), with
:data:`~franca.data.datasets.base.IGNORE_INDEX` = 255 on object borders and "difficult" regions; with ``masks=false``
-1, as every unlabelled dataset (RASA training reads images only).
"""

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from franca.data.datasets.base import READ_ERRORS, ImageDataset
from franca.data.datasets.files import require_directory
from franca.data.datasets.registry import register_dataset

NUM_CLASSES = 21
SPLITS = ("train", "trainaug", "val", "trainval")
CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _parse_bool(value: str | bool, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise ValueError(f"VOC {key}={value!r} is not a boolean; write {key}=true or {key}=false")


def decode_mask(path: str | Path) -> Image.Image:
    """A VOC class mask as an ``"L"`` image of class indices (palette ``"P"`` PNGs keep their indices)."""
    with Image.open(path) as mask:
        if mask.mode not in ("P", "L"):
            raise ValueError(f"VOC mask {str(path)!r} has mode {mask.mode!r}; expected a palette (P) or grey (L) PNG")
        return Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="L")


class VOCSegmentation(ImageDataset):
    """Pascal VOC 2012 segmentation images (and masks); see the module docstring for the layout and targets."""

    def __init__(
        self,
        root: str,
        split: str,
        masks: str | bool = True,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
    ):
        super().__init__(root, transform, target_transform)
        if split not in SPLITS:
            raise ValueError(f"VOC split={split!r} is unknown; choose one of {', '.join(SPLITS)}")
        self.split = split
        self.with_masks = _parse_bool(masks, "masks")
        directory = require_directory(root, "VOC root (the VOCdevkit/VOC2012 folder)")
        if not (directory / "JPEGImages").is_dir():
            raise FileNotFoundError(
                f"VOC root {root!r} has no JPEGImages/ folder; pass root=<...>/VOCdevkit/VOC2012 (the folder that "
                "holds JPEGImages, SegmentationClass and ImageSets)"
            )
        self._directory = directory
        self._ids = self._read_ids(directory / "ImageSets" / "Segmentation" / f"{split}.txt")
        self._mask_dir = directory / ("SegmentationClassAug" if split == "trainaug" else "SegmentationClass")
        self._check_files()

    def _read_ids(self, list_file: Path) -> list[str]:
        if not list_file.is_file():
            hint = (
                "trainaug needs the SBD-augmented list ImageSets/Segmentation/trainaug.txt and the masks "
                "SegmentationClassAug/ added to the VOC folder (see docs/rasa.md)"
                if self.split == "trainaug"
                else "the VOC 2012 archive ships it; check root="
            )
            raise FileNotFoundError(f"VOC image list {str(list_file)!r} does not exist; {hint}")
        ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
        if not ids:
            raise ValueError(f"VOC image list {str(list_file)!r} is empty; it should name one image id per line")
        return ids

    def _check_files(self) -> None:
        wanted = [self._image_path(i) for i in range(len(self))]
        if self.with_masks:
            if not self._mask_dir.is_dir():
                raise FileNotFoundError(
                    f"VOC split {self.split!r} needs masks in {str(self._mask_dir)!r}, which does not exist; add "
                    "them, or read images only with masks=false"
                )
            wanted += [self._mask_path(i) for i in range(len(self))]
        missing = [str(path) for path in wanted if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"VOC split {self.split!r} at {self.root!r}: {len(missing)} listed files are missing, e.g. "
                f"{missing[:3]}; check the root and that the archive was fully extracted"
            )

    def _image_path(self, index: int) -> Path:
        return self._directory / "JPEGImages" / f"{self._ids[index]}.jpg"

    def _mask_path(self, index: int) -> Path:
        return self._mask_dir / f"{self._ids[index]}.png"

    def __len__(self) -> int:
        return len(self._ids)

    def read_image(self, index: int) -> Image.Image:
        return self.decode(self._image_path(index))

    def get_target(self, index: int) -> Image.Image | int:
        """The class mask (``"L"`` image, 255 = ignore) with ``masks=true``, else -1."""
        if not self.with_masks:
            return -1
        path = self._mask_path(index)
        try:
            return decode_mask(path)
        except READ_ERRORS as error:
            raise ValueError(
                f"VOC mask {str(path)!r} cannot be read ({type(error).__name__}: {error}); restore the file, or "
                "read images only with masks=false"
            ) from error

    def describe(self, index: int) -> str:
        return str(self._image_path(index))


def _make_voc(split: str, root: str, masks: str = "true", **kwargs) -> VOCSegmentation:
    return VOCSegmentation(root=root, split=split, masks=masks, **kwargs)


register_dataset("VOC", _make_voc, keys=("root", "split", "masks"), required_keys=("root", "split"))
