"""Aligning a teacher's patch tokens with a student's token grid (distillation, training.md "Distil").

Teacher and student see the same crop but may cut it differently: patch 14 against 16 (a 224 px crop gives 16 × 16
against 14 × 14 tokens), or a CNN's stride 32 (7 × 7). The teacher's token map is resized to the student's grid,
so student token (i, j) is compared with the teacher's features over the same image area.

Interpolation: bilinear with ``align_corners=False``, computed in fp32 (fp64 stays fp64). ``align_corners=False``
treats token (i, j) as the cell [i·P, (i + 1)·P) of the image, which is what a patch is, so cell centres line up
whatever the two patch sizes, and a feature that varies linearly over the image is carried over exactly (away from the
borders). When the teacher's grid is at least twice as fine as the student's along an axis (a CNN's stride 32 against
patch 14), plain bilinear would read only 2 of every 2+ teacher tokens; there ``antialias=True`` averages every
teacher token under a student cell with a triangle filter (PyTorch's antialiased resize, exact on linear features
inside the grid at integer ratios, within 2% of a cell inside and 10% at the border otherwise). Below a ratio of 2
every teacher token already reaches a student token, and the antialiased filter would only blur and shift (it is not
exact on linear features at ratios such as 16/14), so it is off. Equal grids are returned unchanged.

A crop whose side is not a multiple of the teacher's patch (96 px local crops for a patch-14 teacher) is resized to
the nearest multiple before the teacher sees it (:func:`fit_to_patch`: bilinear, antialiased, a change of a few
pixels).
"""

import torch
import torch.nn.functional as F

from franca.utils.precision import at_least_fp32


def resize_patch_tokens(tokens: torch.Tensor, source: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """Tokens [B, h·w, D] on a ``source`` = (h, w) grid → [B, H·W, D] on ``target`` = (H, W), in the input's dtype
    (module docstring: bilinear, align_corners=False, antialiased from a 2× finer grid)."""
    if tuple(source) == tuple(target):
        return tokens
    batch, n_tokens, dim = tokens.shape
    if n_tokens != source[0] * source[1]:
        raise ValueError(f"{n_tokens} tokens do not form a {source[0]}x{source[1]} grid")
    antialias = any(s >= 2 * t for s, t in zip(source, target))
    with torch.autocast(tokens.device.type, enabled=False):
        grid = at_least_fp32(tokens).transpose(1, 2).reshape(batch, dim, *source)
        resized = F.interpolate(grid, size=tuple(target), mode="bilinear", align_corners=False, antialias=antialias)
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
