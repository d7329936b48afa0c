"""Aligning a teacher's patch tokens with a student's token grid (distillation, training.md "Distil").

Teacher and student see the same crop but may cut it differently: patch 14 against 16 (a 224 px crop gives 16 × 16
against 14 × 14 tokens), or a CNN's stride 32 (7 × 7). The teacher's token map is resized to the student's grid,
so student token (i, j) is compared with the teacher's features over the same image area.

Interpolation: bilinear with ``align_corners=False`` and ``antialias=True``, computed in fp32 (fp64 stays fp64).
``align_corners=False`` treats token (i, j) as the cell [i·P, (i + 1)·P) of the image, which is what a patch is, so
cell centres line up whatever the two patch sizes. ``antialias=True`` makes a downsampling (teacher grid finer than
the student's, the usual case) average every teacher token under a student cell with a triangle filter instead of
sampling the two nearest ones, and an upsampling is plain bilinear. Equal grids are returned unchanged.

A crop whose side is not a multiple of the teacher's patch (96 px local crops for a patch-14 teacher) is resized to
the nearest multiple before the teacher sees it (:func:`fit_to_patch`), with the same interpolation.
"""

import torch
import torch.nn.functional as F

from franca.utils.precision import at_least_fp32


def grid_of(tokens: torch.Tensor, height: int, width: int, patch_size: int) -> tuple[int, int]:
    """The (rows, columns) of the token grid of an H × W image cut into P × P patches, checked against ``tokens``."""
    grid = (height // patch_size, width // patch_size)
    if tokens.shape[1] != grid[0] * grid[1]:
        raise ValueError(
            f"{tokens.shape[1]} tokens do not form the {grid[0]}x{grid[1]} grid of a {height}x{width} image"
        )
    return grid


def resize_patch_tokens(tokens: torch.Tensor, source: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """Tokens [B, h·w, D] on a ``source`` = (h, w) grid → [B, H·W, D] on ``target`` = (H, W), in the input's dtype
    (module docstring: bilinear, align_corners=False, antialias)."""
    if tuple(source) == tuple(target):
        return tokens
    batch, n_tokens, dim = tokens.shape
    if n_tokens != source[0] * source[1]:
        raise ValueError(f"{n_tokens} tokens do not form a {source[0]}x{source[1]} grid")
    with torch.autocast(tokens.device.type, enabled=False):
        grid = at_least_fp32(tokens).transpose(1, 2).reshape(batch, dim, *source)
        resized = F.interpolate(grid, size=tuple(target), mode="bilinear", align_corners=False, antialias=True)
    return resized.flatten(2).transpose(1, 2).to(tokens.dtype)


def fit_to_patch(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Images [B, C, H, W] resized to the nearest multiples of ``patch_size`` (at least one patch); unchanged when
    they already are."""
    height, width = images.shape[-2:]
    size = tuple(max(patch_size, round(side / patch_size) * patch_size) for side in (height, width))
    if size == (height, width):
        return images
    with torch.autocast(images.device.type, enabled=False):
        resized = F.interpolate(at_least_fp32(images), size=size, mode="bilinear", align_corners=False, antialias=True)
    return resized.to(images.dtype)
