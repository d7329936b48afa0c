"""Pictures of evaluation outputs: normalised images back to pixels, label maps in a fixed palette, PNG bytes."""

import io

import numpy as np
import torch
from PIL import Image

from franca.data.augmentations import IMAGENET_MEAN, IMAGENET_STD
from franca.data.datasets.base import IGNORE_INDEX

IGNORED_COLOUR = (0, 0, 0)


def denormalise(image: torch.Tensor) -> np.ndarray:
    """A [3, H, W] image normalised with the ImageNet mean and std → [H, W, 3] uint8 pixels."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = (image.detach().cpu().float() * std + mean).clamp(0, 1) * 255
    return pixels.round().byte().permute(1, 2, 0).numpy()


def palette(num_colours: int = 256) -> np.ndarray:
    """[num_colours, 3] uint8: distinct, reproducible colours for class indices (golden-angle hues)."""
    hues = (np.arange(num_colours) * 0.618033988749895) % 1.0
    image = Image.fromarray(
        np.stack([hues * 255, np.full(num_colours, 200), np.full(num_colours, 230)], axis=1)[None].astype(np.uint8),
        mode="HSV",
    )
    return np.asarray(image.convert("RGB"))[0]


def colour_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """A [H, W] label map → [H, W, 3] uint8; ``ignore_index`` pixels are black."""
    values = labels.detach().cpu().long().numpy()
    colours = palette()[np.clip(values, 0, 255)]
    colours[values == ignore_index] = IGNORED_COLOUR
    return colours


def label_grid(images: list[np.ndarray], rows: list[tuple[torch.Tensor, torch.Tensor]]) -> Image.Image:
    """One row per image: the image, its ground truth and a prediction, each resized to the image's size."""
    tiles = []
    for image, (truth, prediction) in zip(images, rows, strict=True):
        height, width = image.shape[:2]
        maps = [Image.fromarray(colour_labels(m)).resize((width, height), Image.NEAREST) for m in (truth, prediction)]
        tiles.append(np.concatenate([image, *(np.asarray(m) for m in maps)], axis=1))
    width = max(t.shape[1] for t in tiles)
    padded = [np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0))) for t in tiles]
    return Image.fromarray(np.concatenate(padded, axis=0))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
