"""Multi-crop augmentation split in two (the original ``DataAugmentationDINO``): geometry and parameter draws per
sample, photometric ops on crop batches.

:class:`DataAugmentationDINO` does everything per image in the loader workers, which caps the loader at about 20
img/s per CPU core (benchmarks/RESULTS.md, Data pipeline). Here the workers keep what must be per image, decoding and
the per-crop geometry (RandomResizedCrop + flip), and only *draw* each crop's photometric parameters: colour jitter
(its factors and its random order of the four operations), grayscale, blur σ and solarisation. The draws use torch's
global RNG with the same calls in the same order as the per-image transform, so under the same per-sample
seed (:class:`~franca.data.seeded_transform.SeededTransformDataset`) both paths give the same crops and parameters,
and resume and world-size independence stay exact. The collate stacks the uint8 crops and their parameter vectors
crop-major; on the training device :func:`apply_photometric` applies the parameters to whole crop batches with
torchvision's formulas in float32 (no uint8 rounding between the operations, docs/deviations.md).
"""

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from franca.data.augmentations import (
    BLUR_KERNEL_SIZE,
    BLUR_SIGMA,
    COLOUR_JITTER,
    COLOUR_JITTER_PROBABILITY,
    GRAYSCALE_PROBABILITY,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SOLARIZE_PROBABILITY,
    SOLARIZE_THRESHOLD,
    MultiCropSettings,
    capped_blur_kernel,
)

# Columns of a crop's parameter vector (float32 [N_PARAMS]). The jitter factors are torchvision's (brightness,
# contrast, saturation multiply; hue adds a shift in turns); ORDER holds the jitter's permutation of those four
# operations (0 brightness, 1 contrast, 2 saturation, 3 hue); flags are 0 or 1; SIGMA is 0 without blur.
JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3, 4
ORDER = slice(5, 9)
GRAYSCALE, BLUR, SIGMA, SOLARIZE = 9, 10, 11, 12
N_PARAMS = 13
_IDENTITY = (0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0)
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


# ------------------------------------------------------------------------------------------------- worker half
def _jitter_ranges() -> tuple[tuple[float, float], ...]:
    """(low, high) of the brightness, contrast, saturation and hue draws, as torchvision's ColorJitter derives them
    from COLOUR_JITTER (so both paths pass the same bounds to ``uniform_``)."""
    jitter = v2.ColorJitter(**COLOUR_JITTER)
    return jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue


_JITTER_RANGES = _jitter_ranges()


def draw_photometric_params(blur_probability: float, solarize_probability: float | None = None) -> torch.Tensor:
    """One crop's parameter vector, drawn from torch's global RNG exactly as the per-image transform draws them.

    The calls mirror torchvision's: ``RandomApply`` draws ``rand(1)`` and applies when it is below p; ColorJitter then
    draws ``randperm(4)`` and one ``uniform_`` per factor; ``RandomGrayscale`` one ``rand(1)``; the blur ``rand(1)``
    (even at p 0) and σ when applied; ``RandomSolarize`` one ``rand(1)`` where the crop has that step
    (``solarize_probability`` not None: the second global crop).
    """
    params = torch.tensor(_IDENTITY)
    if torch.rand(1) < COLOUR_JITTER_PROBABILITY:
        params[JITTER] = 1.0
        params[ORDER] = torch.randperm(4).float()
        for column, (low, high) in zip((BRIGHTNESS, CONTRAST, SATURATION, HUE), _JITTER_RANGES, strict=True):
            params[column] = float(torch.empty(1).uniform_(low, high).item())
    params[GRAYSCALE] = float(torch.rand(1) < GRAYSCALE_PROBABILITY)
    if torch.rand(1) < blur_probability:
        params[BLUR] = 1.0
        params[SIGMA] = torch.empty(1).uniform_(BLUR_SIGMA[0], BLUR_SIGMA[1]).item()
    if solarize_probability is not None:
        params[SOLARIZE] = float(torch.rand(1) < solarize_probability)
    return params


class SplitDataAugmentationDINO(MultiCropSettings):
    """The worker half of :class:`~franca.data.augmentations.DataAugmentationDINO`: same arguments
    (:class:`~franca.data.augmentations.MultiCropSettings`), same crops.

    Each crop: bicubic RandomResizedCrop + horizontal flip (the same transforms as the per-image path), returned as an
    image tensor (uint8 [3, S, S] for PIL or uint8 input), and its photometric parameters
    (:func:`draw_photometric_params`; blur probabilities from ``blur_quirk``, solarisation on the second global crop).

    Returns ``{"global_crops": [g1, g2], "global_crops_teacher": [g1, g2], "local_crops": [...], "global_params":
    [p1, p2], "local_params": [...], "offsets": ()}``; :func:`apply_photometric` finishes the crops.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.global_transform = v2.Compose(self.global_crop())
        self.local_transform = v2.Compose(self.local_crop())

    @staticmethod
    def _crop_and_draw(
        image: Any, crop: Callable, blur_probability: float, solarize_probability: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One crop and its parameters, in the per-image path's RNG order (geometry first)."""
        pixels = v2.functional.to_image(crop(image)).as_subclass(torch.Tensor)
        return pixels, draw_photometric_params(blur_probability, solarize_probability)

    def __call__(self, image: Any) -> dict[str, Any]:
        global_1 = self._crop_and_draw(image, self.global_transform, self.blur_global_1)
        global_2 = self._crop_and_draw(image, self.global_transform, self.blur_global_2, SOLARIZE_PROBABILITY)
        local = [
            self._crop_and_draw(image, self.local_transform, self.blur_local) for _ in range(self.local_crops_number)
        ]
        global_crops = [global_1[0], global_2[0]]
        return {
            "global_crops": global_crops,
            "global_crops_teacher": global_crops,
            "local_crops": [pixels for pixels, _ in local],
            "global_params": [global_1[1], global_2[1]],
            "local_params": [params for _, params in local],
            "offsets": (),
        }


# ------------------------------------------------------------------------------------------------- device half
def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor·images + (1 − factor)·other, clamped to [0, 1], with one factor per image (torchvision's blend)."""
    factor = factor.view(-1, 1, 1, 1)
    return (images * factor + other * (1.0 - factor)).clamp(0.0, 1.0)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma [N, 1, H, W] of RGB images [N, 3, H, W] with torchvision's ITU-R 601 weights."""
    red, green, blue = images.unbind(dim=1)
    return (red * _GRAY_WEIGHTS[0] + green * _GRAY_WEIGHTS[1] + blue * _GRAY_WEIGHTS[2]).unsqueeze(1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Brightness of float images [N, 3, H, W] scaled by ``factor`` [N] (blend with black)."""
    return (images * factor.view(-1, 1, 1, 1)).clamp(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Contrast by ``factor`` [N]: blend with each image's mean luma."""
    return _blend(images, grayscale(images).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Saturation by ``factor`` [N]: blend with each pixel's luma."""
    return _blend(images, grayscale(images), factor)


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """HSV [N, 3, H, W] (hue in turns) of RGB images, the hexcone model torchvision uses (hue 0 and saturation 0 for
    gray pixels)."""
    red, green, blue = images.unbind(dim=1)
    value, _ = images.max(dim=1)
    chroma = value - images.min(dim=1).values
    gray = chroma == 0
    saturation = chroma / torch.where(gray, torch.ones_like(value), value)
    safe_chroma = torch.where(gray, torch.ones_like(chroma), chroma)
    sector = torch.where(
        value == red,
        (green - blue) / safe_chroma,
        torch.where(value == green, 2.0 + (blue - red) / safe_chroma, 4.0 + (red - green) / safe_chroma),
    )
    hue = torch.where(gray, torch.zeros_like(sector), sector / 6.0) % 1.0
    return torch.stack((hue, saturation, value), dim=1)


# For each hue sector 0..5, which of (v, p, q, t) each of R, G, B takes.
_HSV_SECTOR_CHANNELS = ((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2))


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """RGB images of HSV [N, 3, H, W] (hue in turns); p, q and t clamped to [0, 1] as torchvision does."""
    hue, saturation, value = hsv.unbind(dim=1)
    scaled = hue * 6.0
    sector = torch.floor(scaled)
    fraction = scaled - sector
    p = (value * (1.0 - saturation)).clamp(0.0, 1.0)
    q = (value * (1.0 - saturation * fraction)).clamp(0.0, 1.0)
    t = (value * (1.0 - saturation * (1.0 - fraction))).clamp(0.0, 1.0)
    candidates = torch.stack((value, p, q, t), dim=1)
    table = torch.tensor(_HSV_SECTOR_CHANNELS, device=hsv.device)
    choice = table[:, sector.long().remainder(6)].transpose(0, 1)
    return candidates.gather(1, choice)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Hue rotated by ``shift`` [N] turns (in [−0.5, 0.5]) through HSV."""
    hsv = rgb_to_hsv(images)
    hue = (hsv[:, 0] + shift.view(-1, 1, 1)) % 1.0
    return hsv_to_rgb(torch.cat((hue.unsqueeze(1), hsv[:, 1:]), dim=1))


# ColorJitter's operations by their index in ORDER, with the parameter column each one reads.
JITTER_OPS = (
    (adjust_brightness, BRIGHTNESS),
    (adjust_contrast, CONTRAST),
    (adjust_saturation, SATURATION),
    (adjust_hue, HUE),
)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int = BLUR_KERNEL_SIZE) -> torch.Tensor:
    """Gaussian blur of [N, C, H, W] with σ [N], torchvision's kernel and reflect padding, as two 1-D convolutions.

    The kernel is capped for images under 5 px as :class:`~franca.data.augmentations.SizeCappedGaussianBlur` does.
    """
    n, channels, height, width = images.shape
    kernel_size = capped_blur_kernel(kernel_size, min(height, width))
    half = (kernel_size - 1) * 0.5
    offsets = torch.linspace(-half, half, kernel_size, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma.to(images.dtype).view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
    pad = kernel_size // 2
    planes = F.pad(images.reshape(1, n * channels, height, width), [pad, pad, pad, pad], mode="reflect")
    planes = F.conv2d(planes, kernel.view(n * channels, 1, 1, kernel_size), groups=n * channels)
    planes = F.conv2d(planes, kernel.view(n * channels, 1, kernel_size, 1), groups=n * channels)
    return planes.view(n, channels, height, width)


def solarize(images: torch.Tensor) -> torch.Tensor:
    """Pixels at or above 128/255 inverted (torchvision's RandomSolarize threshold 128 on uint8 images)."""
    return torch.where(images >= SOLARIZE_THRESHOLD / 255, 1.0 - images, images)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet mean and std normalisation of [N, 3, H, W]."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def to_unit_float(crops: torch.Tensor) -> torch.Tensor:
    """A new float32 tensor of ``crops``: uint8 scaled to [0, 1], float copied as it is."""
    if crops.dtype == torch.uint8:
        return crops.to(torch.float32) / 255.0
    if crops.is_floating_point():
        return crops.to(torch.float32, copy=True)
    raise TypeError(f"crops of dtype {crops.dtype} cannot be augmented; give uint8 or float crops in [0, 1]")


def _apply_to_rows(images: torch.Tensor, rows: torch.Tensor, op: Callable, *per_row: torch.Tensor) -> torch.Tensor:
    """``images[rows] = op(images[rows], *per_row[rows])`` in place; ``rows`` is a bool mask on the CPU.

    The rows are chosen on the CPU (the parameters arrive there from the loader), so no device sync is needed.
    """
    index = rows.nonzero().flatten()
    if index.numel() == 0:
        return images
    index = index.to(images.device, non_blocking=True)
    images[index] = op(images[index], *(values[index] for values in per_row))
    return images


def _check_params(crops: torch.Tensor, params: torch.Tensor) -> None:
    if crops.dim() != 4 or crops.shape[1] != 3:
        raise ValueError(f"crops of shape {tuple(crops.shape)}; apply_photometric needs RGB crop batches [N, 3, H, W]")
    if params.shape != (crops.shape[0], N_PARAMS):
        raise ValueError(
            f"params of shape {tuple(params.shape)} for {crops.shape[0]} crops; give one parameter vector of "
            f"{N_PARAMS} values per crop, as SplitDataAugmentationDINO draws them"
        )


def apply_photometric(crops: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Colour jitter, grayscale, blur, solarisation and normalisation of crops [N, 3, S, S] with per-crop ``params``
    [N, N_PARAMS]; returns normalised float32 crops on the crops' device.

    Each crop's jitter runs its own order of the four operations: position by position, the crops whose operation
    at that position is k get operation k (so the work is that of one order for all). ``params`` may be on the CPU,
    where the row selection is computed; the values are copied to the crops' device.
    """
    if crops.numel() == 0 and params.numel() == 0:  # no crops of this kind (e.g. local_crops_number = 0)
        return crops.to(torch.float32)
    _check_params(crops, params)
    images = to_unit_float(crops)
    plan = params.cpu()
    values = params.to(images.device, torch.float32, non_blocking=True)
    jittered, order = plan[:, JITTER] > 0, plan[:, ORDER]
    for position in range(4):
        for op_index, (op, column) in enumerate(JITTER_OPS):
            rows = jittered & (order[:, position] == op_index)
            images = _apply_to_rows(images, rows, op, values[:, column])
    images = _apply_to_rows(images, plan[:, GRAYSCALE] > 0, lambda x: grayscale(x).expand_as(x))
    images = _apply_to_rows(images, plan[:, BLUR] > 0, gaussian_blur, values[:, SIGMA])
    images = _apply_to_rows(images, plan[:, SOLARIZE] > 0, solarize)
    return normalize(images)


def apply_photometric_to_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """A collated batch of the split path (uint8 crops + ``photometric_params``) with its crops finished by
    :func:`apply_photometric`, as the per-image path's collate would have given them."""
    if "photometric_params" not in batch:
        raise KeyError(
            "the batch has no photometric_params: it was not collated from SplitDataAugmentationDINO samples; "
            "build the loader with the split transform (crops.batched_photometric) or skip the batched ops"
        )
    finished = dict(batch)
    params = finished.pop("photometric_params")
    for kind in ("global", "local"):
        key = f"collated_{kind}_crops"
        finished[key] = apply_photometric(finished[key], params[kind])
    return finished
