"""2-D rotary position embeddings (RoPE) of the patch queries and keys, as DINOv3 ViTs use them instead of a learned
position table (docs/export.md, "DINOv3 backbones").

Each patch gets a centre coordinate per axis, ``(i + 0.5) / n`` mapped to [-1, 1], where n is the axis' own patch
count (``"separate"``) or the smaller / larger of the two (``"min"`` / ``"max"``), so any image size gives
coordinates in the same range. A head of dimension d uses d/4 periods ``base ** (2k / (d/2))``, k = 0 … d/4 − 1; the
angles ``2π · coordinate / period`` of the row axis then the column axis fill d/2 channels, repeated once to fill d.
Queries and keys are rotated as ``x · cos + rotate_half(x) · sin``, where ``rotate_half`` maps the halves (a, b) to
(−b, a). Prefix tokens (CLS, registers) are not rotated. Everything is computed in float32 from the grid size at run
time: the module has no parameters and no buffers, so state dicts are unchanged.
"""

import math

import torch
from torch import nn


def patch_coordinates(height: int, width: int, normalize: str, device: torch.device | None = None) -> torch.Tensor:
    """[height · width, 2] float32 (row, column) centres in [-1, 1], row-major as the patch tokens."""
    denominators = {"separate": (height, width), "min": (min(height, width),) * 2, "max": (max(height, width),) * 2}
    if normalize not in denominators:
        raise ValueError(f"unknown RoPE coordinate normalisation {normalize!r}; choose one of {sorted(denominators)}")
    row_norm, col_norm = denominators[normalize]
    rows = torch.arange(0.5, height, device=device, dtype=torch.float32) / row_norm
    cols = torch.arange(0.5, width, device=device, dtype=torch.float32) / col_norm
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).flatten(0, 1)
    return 2.0 * grid - 1.0


def rope_periods(head_dim: int, base: float, device: torch.device | None = None) -> torch.Tensor:
    """[head_dim / 4] float32 periods ``base ** (2k / (head_dim / 2))``."""
    quarter = head_dim // 4
    exponents = 2.0 * torch.arange(quarter, device=device, dtype=torch.float32) / (head_dim // 2)
    return base**exponents


class RotaryPositions(nn.Module):
    """(sin, cos) [h · w, head_dim] float32 tables for an h × w patch grid."""

    def __init__(self, head_dim: int, base: float = 100.0, normalize_coords: str = "separate"):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RoPE needs a head dimension divisible by 4, got {head_dim}")
        self.head_dim = head_dim
        self.base = base
        self.normalize_coords = normalize_coords

    def forward(self, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        coords = patch_coordinates(height, width, self.normalize_coords, device)
        periods = rope_periods(self.head_dim, self.base, device)
        angles = (2 * math.pi * coords[:, :, None] / periods[None, None, :]).flatten(1, 2)
        angles = angles.tile(2)
        return angles.sin(), angles.cos()

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}, normalize_coords={self.normalize_coords!r}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate the last ``sin.shape[0]`` tokens of x [..., N, head_dim] (the patches); earlier ones pass unchanged.
    The rotation runs in float32 (or x's dtype if wider) and the result has x's dtype."""
    prefix = x.shape[-2] - sin.shape[0]
    patches = x[..., prefix:, :]
    rotated = (patches * cos + rotate_half(patches) * sin).to(x.dtype)
    return torch.cat((x[..., :prefix, :], rotated), dim=-2)
