"""Pictures of evaluation outputs: normalised images back to pixels, label maps in a fixed palette, and grids that
read at a glance (panels enlarged by nearest neighbour to a readable size, titled columns, gaps, a legend), PNG bytes.
"""

import io
import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from franca.data.augmentations import IMAGENET_MEAN, IMAGENET_STD
from franca.data.datasets.base import IGNORE_INDEX

IGNORED_COLOUR = (0, 0, 0)
# Class 0 is the background of most segmentation sets (VOC, ADE20K's "other"): a neutral grey, so that the classes
# that matter carry the colours.
CLASS_ZERO_COLOUR = (150, 150, 150)
PANEL_MIN_SIDE = 128
GAP = 6
FONT_SIZE = 13
TEXT_COLOUR = (20, 20, 20)
CANVAS_COLOUR = (255, 255, 255)
SWATCH = 12


def denormalise(image: torch.Tensor) -> np.ndarray:
    """A [3, H, W] image normalised with the ImageNet mean and std → [H, W, 3] uint8 pixels."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = (image.detach().cpu().float() * std + mean).clamp(0, 1) * 255
    return pixels.round().byte().permute(1, 2, 0).numpy()


def palette(num_colours: int = 256) -> np.ndarray:
    """[num_colours, 3] uint8: class 0 neutral grey, the others distinct, reproducible colours (golden-angle hues)."""
    hues = (np.arange(num_colours) * 0.618033988749895) % 1.0
    image = Image.fromarray(
        np.stack([hues * 255, np.full(num_colours, 200), np.full(num_colours, 230)], axis=1)[None].astype(np.uint8),
        mode="HSV",
    )
    colours = np.asarray(image.convert("RGB"))[0].copy()
    colours[0] = CLASS_ZERO_COLOUR
    return colours


def colour_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """A [H, W] label map → [H, W, 3] uint8; ``ignore_index`` pixels are black."""
    values = labels.detach().cpu().long().numpy()
    colours = palette()[np.clip(values, 0, 255)]
    colours[values == ignore_index] = IGNORED_COLOUR
    return colours


def label_legend(label_maps: list[torch.Tensor], names: list[str] | None = None) -> list[tuple[str, tuple]]:
    """(name, colour) of every class that occurs in ``label_maps``, and "ignored" when some pixel is."""
    present = sorted(set(torch.cat([m.reshape(-1).long().cpu() for m in label_maps]).tolist()))
    colours = palette()
    legend = [
        (names[c] if names and c < len(names) else f"class {c}", tuple(int(v) for v in colours[min(c, 255)]))
        for c in present
        if c != IGNORE_INDEX
    ]
    return legend + ([("ignored", IGNORED_COLOUR)] if IGNORE_INDEX in present else [])


def upscale_factor(height: int, width: int, min_side: int = PANEL_MIN_SIDE) -> int:
    """The integer enlargement that brings the shorter side of a panel to at least ``min_side`` pixels (1: none)."""
    return max(1, math.ceil(min_side / max(1, min(height, width))))


def enlarge(pixels: np.ndarray, factor: int) -> np.ndarray:
    """[H, W, 3] → [factor·H, factor·W, 3] by repeating each pixel (nearest neighbour: no blur, labels stay labels)."""
    return pixels.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else pixels


def font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def text_width(text: str, size: int = FONT_SIZE) -> int:
    left, _, right, _ = font(size).getbbox(text)
    return right - left


def picture_grid(
    rows: list[list[np.ndarray]],
    titles: list[str],
    legend: list[tuple[str, tuple]] | None = None,
    min_side: int = PANEL_MIN_SIDE,
) -> Image.Image:
    """Rows of uint8 panels [H, W, 3] (every panel of a column the same size) → one picture.

    Panels are enlarged by one integer factor (:func:`upscale_factor` of the smallest panel) with nearest neighbour;
    each column is at least as wide as its title, drawn above it; ``GAP`` pixels separate panels; ``legend`` adds a
    row of colour swatches with their names below.
    """
    if not rows or any(len(row) != len(titles) for row in rows):
        raise ValueError(f"picture_grid needs rows of {len(titles)} panels (one per title), got {len(rows)} rows")
    factor = upscale_factor(*min(((p.shape[0], p.shape[1]) for row in rows for p in row), key=min), min_side)
    panels = [[enlarge(panel, factor) for panel in row] for row in rows]
    widths = [max(max(row[c].shape[1] for row in panels), text_width(title) + 4) for c, title in enumerate(titles)]
    heights = [max(panel.shape[0] for panel in row) for row in panels]
    header = FONT_SIZE + 8
    width = sum(widths) + GAP * (len(widths) - 1)
    legend_lines = _legend_lines(legend or [], width)
    legend_height = GAP + len(legend_lines) * (SWATCH + 6) if legend_lines else 0
    height = header + sum(heights) + GAP * (len(heights) - 1) + legend_height
    canvas = np.full((height, width, 3), CANVAS_COLOUR, dtype=np.uint8)
    top = header
    for row, row_height in zip(panels, heights):
        left = 0
        for panel, column_width in zip(row, widths):
            h, w = panel.shape[:2]
            x = left + (column_width - w) // 2
            canvas[top : top + h, x : x + w] = panel
            left += column_width + GAP
        top += row_height + GAP
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    left = 0
    for title, column_width in zip(titles, widths):
        draw.text((left + (column_width - text_width(title)) // 2, 3), title, fill=TEXT_COLOUR, font=font())
        left += column_width + GAP
    _draw_legend(draw, legend_lines, top)
    return picture


def _legend_lines(legend: list[tuple[str, tuple]], width: int) -> list[list[tuple[str, tuple]]]:
    """The legend entries wrapped into lines that fit ``width`` pixels."""
    lines, line, used = [], [], 0
    for name, colour in legend:
        entry = SWATCH + 4 + text_width(name) + 14
        if line and used + entry > width:
            lines.append(line)
            line, used = [], 0
        line.append((name, colour))
        used += entry
    return lines + ([line] if line else [])


def _draw_legend(draw: ImageDraw.ImageDraw, lines: list[list[tuple[str, tuple]]], top: int) -> None:
    for number, line in enumerate(lines):
        y, x = top + number * (SWATCH + 6), 0
        for name, colour in line:
            draw.rectangle((x, y, x + SWATCH - 1, y + SWATCH - 1), fill=tuple(colour), outline=TEXT_COLOUR)
            draw.text((x + SWATCH + 4, y - 1), name, fill=TEXT_COLOUR, font=font())
            x += SWATCH + 4 + text_width(name) + 14


def label_grid(
    images: list[np.ndarray], rows: list[tuple[torch.Tensor, torch.Tensor]], names: list[str] | None = None
) -> Image.Image:
    """One row per image: the image, its ground truth and a prediction (label maps resized to the image's size by
    nearest neighbour), titled columns and a legend of the classes shown (:func:`picture_grid`)."""
    panels = []
    for image, (truth, prediction) in zip(images, rows, strict=True):
        height, width = image.shape[:2]
        maps = [Image.fromarray(colour_labels(m)).resize((width, height), Image.NEAREST) for m in (truth, prediction)]
        panels.append([image, *(np.asarray(m) for m in maps)])
    legend = label_legend([m for pair in rows for m in pair], names)
    return picture_grid(panels, ["image", "ground truth", "prediction"], legend)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
