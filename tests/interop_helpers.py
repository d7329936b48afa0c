"""Helpers of the transformers / timm interop tests: random weights that make attention selective (so a wrong
position, rotation or token order shows), and the token comparison against a library's own output."""

import torch
from torch import nn

SCALE_NAMES = ("gamma", "lambda1", "ls1", "ls2")


@torch.no_grad()
def randomise_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter drawn anew: matrices N(0, (1.5/√fan_in)²), norms' scales 1 ± 0.2, layer scales 0.5 ± 0.2,
    other vectors and tokens N(0, 0.5²). Library defaults (LayerScale 1e-5, zero biases) would hide errors."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if param.ndim >= 2 and not name.endswith(("token", "tokens", "embed", "embeddings", "reg_token")):
            value = noise * 1.5 / param[0].numel() ** 0.5
        elif any(s in name for s in SCALE_NAMES):
            value = 0.5 + 0.2 * noise
        elif "norm" in name and name.endswith("weight"):
            value = 1.0 + 0.2 * noise
        else:
            value = 0.5 * noise
        param.copy_(value.to(param.dtype))
    return model


def max_differences(tokens: torch.Tensor, ours: dict, registers: int) -> tuple[float, float]:
    """Max |difference| of the CLS and of the patch tokens: ``tokens`` [B, 1 + R + N, D] (a library's normed output)
    against our ``forward_features`` dict."""
    cls = (tokens[:, 0] - ours["x_norm_clstoken"]).abs().max().item()
    patches = (tokens[:, 1 + registers :] - ours["x_norm_patchtokens"]).abs().max().item()
    return cls, patches
