"""Image transforms: Franca's multi-crop augmentation (valeoai/Franca ``franca/data/augmentations.py``,
``DataAugmentationDINO``) and the classification transforms (original ``franca/data/transforms.py``).

All randomness is drawn from torch's global RNG (torchvision.transforms.v2 does the same), so a sample's crops are
fixed by seeding that RNG, which :class:`franca.data.seeded_transform.SeededTransformDataset` does per sample.
"""

from typing import Any, Sequence

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The photometric settings of the original ``DataAugmentationDINO``, shared by the per-image transform and the batched
# one (franca.data.batched_augmentations), which must draw and apply the same parameters.
COLOUR_JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}
COLOUR_JITTER_PROBABILITY = 0.8
GRAYSCALE_PROBABILITY = 0.2
BLUR_KERNEL_SIZE = 9
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128
SOLARIZE_PROBABILITY = 0.2


def make_normalize_transform() -> v2.Compose:
    """PIL / uint8 image → float tensor normalised with the ImageNet mean and std."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class SizeCappedGaussianBlur:
    """Gaussian blur with σ ~ U(σ_min, σ_max) and the original's kernel 9, shrunk for images smaller than 5 px.

    The blur pads by reflection, which needs the padding (kernel // 2) below the image side; the kernel is capped at
    2·side − 1 so tiny crops still work. For crops of 5 px or more this is torchvision's GaussianBlur(9, σ).
    """

    def __init__(self, kernel_size: int = 9, sigma: tuple[float, float] = (0.1, 2.0)):
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"blur kernel_size={kernel_size} must be a positive odd number")
        self.kernel_size = kernel_size
        self.sigma = sigma

    def __call__(self, image: Any) -> Any:
        kernel = capped_blur_kernel(self.kernel_size, min(v2.functional.get_size(image)))
        sigma = torch.empty(1).uniform_(self.sigma[0], self.sigma[1]).item()
        return v2.functional.gaussian_blur(image, kernel_size=[kernel, kernel], sigma=[sigma, sigma])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kernel_size={self.kernel_size}, sigma={self.sigma})"


def capped_blur_kernel(kernel_size: int, shortest_side: int) -> int:
    """The blur kernel for an image whose shortest side is ``shortest_side``: at most 2·side − 1, so that the reflect
    padding (kernel // 2) stays below the side."""
    return min(kernel_size, 2 * shortest_side - 1)


def _colour_jitter() -> list[Any]:
    return [
        v2.RandomApply([v2.ColorJitter(**COLOUR_JITTER)], p=COLOUR_JITTER_PROBABILITY),
        v2.RandomGrayscale(p=GRAYSCALE_PROBABILITY),
    ]


def _blur(probability: float) -> v2.RandomApply:
    return v2.RandomApply([SizeCappedGaussianBlur(kernel_size=BLUR_KERNEL_SIZE, sigma=BLUR_SIGMA)], p=probability)


def crop_transforms(size: int, scale: Sequence[float]) -> list[Any]:
    """Bicubic antialiased RandomResizedCrop to ``size``² with area fraction in ``scale``, then a horizontal flip
    (p 0.5): the geometry of every multi-crop crop."""
    return [
        v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
    ]


class MultiCropSettings:
    """The checked settings of a multi-crop transform, shared by the per-image
    :class:`DataAugmentationDINO` and the split :class:`~franca.data.batched_augmentations.SplitDataAugmentationDINO`.

    Two global crops of ``global_crops_size``² with area fraction in ``global_crops_scale`` and
    ``local_crops_number`` local crops of ``local_crops_size``² in ``local_crops_scale``. Blur probabilities: with
    ``blur_quirk=True`` those the original actually uses (global-1 0.0, global-2 0.9, local 0.5; DINOv2's inverted
    ``RandomApply(p=1-p)`` in the original ``GaussianBlur``), otherwise the intended 1.0 / 0.1 / 0.5.
    """

    def __init__(
        self,
        global_crops_scale: Sequence[float],
        local_crops_scale: Sequence[float],
        local_crops_number: int,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        blur_quirk: bool = True,
    ):
        for name, scale in (("global_crops_scale", global_crops_scale), ("local_crops_scale", local_crops_scale)):
            if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
                raise ValueError(f"{name}={tuple(scale)} must be (min, max) with 0 < min <= max <= 1")
        if local_crops_number < 0:
            raise ValueError(f"local_crops_number={local_crops_number} must be >= 0")
        self.global_crops_scale, self.local_crops_scale = tuple(global_crops_scale), tuple(local_crops_scale)
        self.global_crops_size, self.local_crops_size = global_crops_size, local_crops_size
        self.local_crops_number = local_crops_number
        self.blur_global_1, self.blur_global_2, self.blur_local = (0.0, 0.9, 0.5) if blur_quirk else (1.0, 0.1, 0.5)

    def global_crop(self) -> list[Any]:
        """The geometry of a global crop (:func:`crop_transforms`)."""
        return crop_transforms(self.global_crops_size, self.global_crops_scale)

    def local_crop(self) -> list[Any]:
        """The geometry of a local crop (:func:`crop_transforms`)."""
        return crop_transforms(self.local_crops_size, self.local_crops_scale)


class DataAugmentationDINO(MultiCropSettings):
    """Two global and ``local_crops_number`` local crops of one image, augmented per image (as the original).

    Each crop: bicubic RandomResizedCrop + horizontal flip, colour jitter (p 0.8), grayscale (p 0.2), Gaussian blur
    (kernel 9, σ ∈ [0.1, 2], probabilities as :class:`MultiCropSettings`) and, on the second global crop,
    solarisation (threshold 128, p 0.2); then ImageNet normalisation. Arguments: :class:`MultiCropSettings`.

    Returns ``{"global_crops": [g1, g2], "global_crops_teacher": [g1, g2], "local_crops": [...], "offsets": ()}``.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        normalize = make_normalize_transform()
        self.global_transform_1 = v2.Compose(
            [*self.global_crop(), *_colour_jitter(), _blur(self.blur_global_1), normalize]
        )
        self.global_transform_2 = v2.Compose(
            [
                *self.global_crop(),
                *_colour_jitter(),
                _blur(self.blur_global_2),
                v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=SOLARIZE_PROBABILITY),
                normalize,
            ]
        )
        self.local_transform = v2.Compose([*self.local_crop(), *_colour_jitter(), _blur(self.blur_local), normalize])

    def __call__(self, image: Any) -> dict[str, Any]:
        global_crops = [self.global_transform_1(image), self.global_transform_2(image)]
        local_crops = [self.local_transform(image) for _ in range(self.local_crops_number)]
        return {
            "global_crops": global_crops,
            "global_crops_teacher": global_crops,
            "local_crops": local_crops,
            "offsets": (),
        }


def make_classification_eval_transform(resize_size: int = 256, crop_size: int = 224) -> v2.Compose:
    """Evaluation transform (original ``transforms.py``): bicubic Resize(shorter side) → CenterCrop → normalise."""
    return v2.Compose(
        [
            v2.Resize(resize_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(crop_size),
            make_normalize_transform(),
        ]
    )


def make_classification_train_transform(crop_size: int = 224, hflip_probability: float = 0.5) -> v2.Compose:
    """Linear-probe training transform (original ``transforms.py``): bicubic RandomResizedCrop + horizontal flip →
    normalise."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(crop_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(p=hflip_probability),
            make_normalize_transform(),
        ]
    )
