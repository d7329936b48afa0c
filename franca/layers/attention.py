"""Multi-head self-attention through ``F.scaled_dot_product_attention``.

SDPA picks the Flash / cuDNN / memory-efficient kernel itself on GPU and has a CPU kernel, so no xFormers is needed
(valeoai/Franca ``franca/layers/attention.py``: the original's ``MemEffAttention`` computes the same
softmax(q·kᵀ/√d)·v). With ``rope=(sin, cos)`` the patch queries and keys are rotated first (DINOv3;
:mod:`franca.layers.rope`); without it the path is the plain one.
"""

import torch
import torch.nn.functional as F
from torch import nn

from franca.layers.rope import apply_rope


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"Attention: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))
