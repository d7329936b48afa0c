"""Image to patch tokens: a stride-P convolution, flattened to [B, N, D] (valeoai/Franca ``PatchEmbed``)."""

import torch
from torch import nn


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(
                f"PatchEmbed: image size {H}x{W} is not divisible by the patch size {self.patch_size}; "
                f"resize or crop the input to a multiple of {self.patch_size} "
                f"(e.g. {H // self.patch_size * self.patch_size}x{W // self.patch_size * self.patch_size})"
            )
        return self.proj(x).flatten(2).transpose(1, 2)
