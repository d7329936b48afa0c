"""SwiGLU feed-forward (``ffn_layer: swiglu`` / ``swiglufused``).

The original maps both names to the same layer (valeoai/Franca ``franca/models/vision_transformer.py``): one
packed ``w12`` projection whose first half is the gate, ``out = w3(silu(x1) * x2)``, hidden width rounded to a
multiple of 8. Keys ``w12``/``w3`` match the releases.
"""

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden_dim(mlp_hidden: int) -> int:
    """Hidden width for a 4·D MLP budget: ((int(2/3 · hidden) + 7) // 8) · 8 (B 2048, L 2736, g 4096)."""
    return (int(mlp_hidden * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, bias: bool = True):
        super().__init__()
        hidden = swiglu_hidden_dim(hidden_features)
        self.w12 = nn.Linear(in_features, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, in_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)
