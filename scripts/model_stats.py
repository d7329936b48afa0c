"""Architecture table of the Franca backbones: sizes, parameter counts and FLOPs at 224 and 518 px.

    python scripts/model_stats.py

Models are built on the ``meta`` device (no memory, no weights) with the Franca configuration of valeoai/Franca
``franca/hub/backbones.py`` (patch 14, SwiGLU, LayerScale, no registers). FLOPs of one forward pass of one image are
counted by ``torch.utils.flop_counter.FlopCounterMode``, which counts 2 FLOPs per multiply-accumulate of the convolution
and matrix products (attention included) and ignores LayerNorm, softmax and activations. Each count is checked against
the closed form 2·[N·3P²·D + depth·(N'·(4D² + 3DH) + 2N'²D)] (N patches, N' = N + 1 tokens, H the SwiGLU width).
Parameters are all backbone tensors, ``pos_embed`` (1 + (size/14)² rows) and ``mask_token`` included.
"""

import torch
from torch.utils.flop_counter import FlopCounterMode

from franca.layers import swiglu_hidden_dim
from franca.models import build_vit
from franca.models.vision_transformer import ARCHITECTURES

ARCHS = ("vit_small", "vit_base", "vit_large", "vit_giant2")
PATCH = 14
SIZES = (224, 518)


def count_flops(arch: str, img_size: int) -> tuple[int, int]:
    """(parameters, forward FLOPs for one image) of ``arch`` built and run at ``img_size``."""
    with torch.device("meta"):
        model = build_vit(arch, img_size=img_size, patch_size=PATCH).eval()
        images = torch.empty(1, 3, img_size, img_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(images)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops()


def closed_form_flops(arch: str, img_size: int) -> int:
    dim, depth, _ = ARCHITECTURES[arch]
    hidden = swiglu_hidden_dim(4 * dim)
    patches = (img_size // PATCH) ** 2
    tokens = patches + 1
    per_block = tokens * (4 * dim * dim + 3 * dim * hidden) + 2 * tokens * tokens * dim
    return 2 * (patches * 3 * PATCH * PATCH * dim + depth * per_block)


def main() -> None:
    header = "| model | D | depth | heads | SwiGLU hidden | params @224 | params @518 | GFLOPs @224 | GFLOPs @518 |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for arch in ARCHS:
        dim, depth, heads = ARCHITECTURES[arch]
        params, flops = {}, {}
        for size in SIZES:
            params[size], flops[size] = count_flops(arch, size)
            expected = closed_form_flops(arch, size)
            if flops[size] != expected:
                raise RuntimeError(f"{arch} at {size}: FlopCounterMode counted {flops[size]}, closed form {expected}")
        print(
            f"| {arch}/14 | {dim} | {depth} | {heads} | {swiglu_hidden_dim(4 * dim)} | "
            f"{params[224] / 1e6:.1f} M | {params[518] / 1e6:.1f} M | {flops[224] / 1e9:.1f} | {flops[518] / 1e9:.1f} |"
        )


if __name__ == "__main__":
    main()
