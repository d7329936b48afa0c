"""Pre-norm transformer block with LayerScale and batch-subset stochastic depth.

Stochastic depth follows the original's training path (valeoai/Franca ``franca/layers/block.py``,
``NestedTensorBlock``, list path): when a rate r > 0 is active in
training, each residual branch is computed for a random subset of ⌊B(1−r)⌋ (≥ 1) samples only and added back scaled
by B/subset. Its expectation equals the classic per-sample DropPath, and it skips r of the branch compute.
``rope`` (sin, cos tables of a RoPE backbone) is passed on to the attention; it is the same for every sample.
"""

from functools import partial

import torch
from torch import nn

from franca.layers.attention import Attention
from franca.layers.layer_scale import LayerScale


def _subset_residual(x: torch.Tensor, branch: nn.Module, rate: float) -> torch.Tensor:
    batch = x.shape[0]
    keep = max(int(batch * (1 - rate)), 1)
    idx = torch.randperm(batch, device=x.device)[:keep]
    residual = branch(x[idx]).to(x.dtype)
    return torch.index_add(x, 0, idx, residual, alpha=batch / keep)


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn: nn.Module,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        layerscale: float | None = 1e-5,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = ffn
        self.ls2 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.drop_path = drop_path

    def _attn_branch(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return self.ls1(self.attn(self.norm1(x), rope))

    def _ffn_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if self.training and self.drop_path > 0.0:
            x = _subset_residual(x, partial(self._attn_branch, rope=rope), self.drop_path)
            return _subset_residual(x, self._ffn_branch, self.drop_path)
        x = x + self._attn_branch(x, rope)
        return x + self._ffn_branch(x)
