"""RoPE in our ViT (franca.layers.rope): the rotation against a float64 formula written here, the ViTConfig fields,
and the plain (learned position) path left as it was."""

import math

import pytest
import torch
from interop_helpers import randomise_

from franca.layers.rope import RotaryPositions, apply_rope, patch_coordinates
from franca.models import ViTConfig
from franca.models.vision_transformer import DinoVisionTransformer, build_vit


def reference_rotation(x: torch.Tensor, height: int, width: int, base: float, denominators) -> torch.Tensor:
    """x [N, d] (row-major patches) rotated pair by pair in float64: channel j < d/2 pairs with j + d/2; the first
    d/4 channels turn with the row coordinate, the next d/4 with the column one, at periods base^(4k/d)."""
    d = x.shape[-1]
    out = x.clone().double()
    for n in range(height * width):
        r, c = divmod(n, width)
        coords = ((r + 0.5) / denominators[0] * 2 - 1, (c + 0.5) / denominators[1] * 2 - 1)
        for j in range(d // 2):
            axis, k = divmod(j, d // 4)
            angle = 2 * math.pi * coords[axis] / base ** (4 * k / d)
            a, b = float(x[n, j]), float(x[n, j + d // 2])
            out[n, j] = a * math.cos(angle) - b * math.sin(angle)
            out[n, j + d // 2] = b * math.cos(angle) + a * math.sin(angle)
    return out


@pytest.mark.parametrize(
    "height, width, normalize, denominators",
    [(3, 5, "separate", (3, 5)), (3, 5, "min", (3, 3)), (4, 2, "max", (4, 4))],
)
def test_rotation_matches_the_pairwise_formula(height, width, normalize, denominators):
    d, prefix = 16, 2
    x = torch.randn(prefix + height * width, d, generator=torch.Generator().manual_seed(0))
    sin, cos = RotaryPositions(d, base=100.0, normalize_coords=normalize)(height, width, torch.device("cpu"))
    rotated = apply_rope(x, sin, cos)
    assert torch.equal(rotated[:prefix], x[:prefix])  # CLS and registers are not rotated
    expected = reference_rotation(x[prefix:], height, width, 100.0, denominators)
    torch.testing.assert_close(rotated[prefix:].double(), expected, atol=2e-6, rtol=0)


def test_coordinates_are_patch_centres_in_minus_one_one():
    coords = patch_coordinates(2, 4, "separate")
    assert coords.tolist() == [[-0.5, x] for x in (-0.75, -0.25, 0.25, 0.75)] + [
        [0.5, x] for x in (-0.75, -0.25, 0.25, 0.75)
    ]
    with pytest.raises(ValueError, match="unknown RoPE coordinate normalisation 'diag'"):
        patch_coordinates(2, 2, "diag")


def test_rope_fields_are_stored_and_checked():
    config = ViTConfig(embed_dim=64, depth=1, num_heads=4, patch_size=16, position_encoding="rope", rope_base=50.0)
    stored = config.to_dict()
    assert stored["position_encoding"] == "rope" and stored["rope_base"] == 50.0
    assert stored["layer_norm_eps"] == 1e-6 and stored["rope_normalize_coords"] == "separate"
    assert ViTConfig.from_dict(stored) == config
    old_file = {k: v for k, v in stored.items() if k not in ("position_encoding", "rope_base", "layer_norm_eps")}
    assert not ViTConfig.from_dict(old_file).uses_rope  # files written before these fields keep the learned table
    with pytest.raises(ValueError, match="position_encoding='sincos' is unknown"):
        ViTConfig(position_encoding="sincos")
    with pytest.raises(ValueError, match="head dimension divisible by 4"):
        ViTConfig(embed_dim=60, num_heads=6, position_encoding="rope")


def test_rope_model_has_no_position_table_and_runs_at_any_size():
    torch.manual_seed(0)
    model = build_vit("vit_tiny", depth=2, patch_size=8, img_size=32, position_encoding="rope", num_register_tokens=2)
    randomise_(model)
    assert model.pos_embed is None and not any("pos_embed" in key for key in model.state_dict())
    model.eval()
    for size in ((32, 32), (24, 40)):
        x = torch.randn(2, 3, *size)
        out = model.forward_features(x)
        n = (size[0] // 8) * (size[1] // 8)
        assert out["x_norm_patchtokens"].shape == (2, n, 192) and out["x_norm_regtokens"].shape == (2, 2, 192)
        last = model.get_intermediate_layers(x, n=1, return_class_token=True)[0]
        torch.testing.assert_close(last[0], out["x_norm_patchtokens"])
    # a shifted image gives other patch features: positions reach the attention
    x = torch.randn(1, 3, 32, 32)
    rolled = torch.roll(x, shifts=8, dims=-1)
    a = model.forward_features(x)["x_norm_patchtokens"].reshape(4, 4, -1)
    b = model.forward_features(rolled)["x_norm_patchtokens"].reshape(4, 4, -1)
    assert (torch.roll(a, 1, dims=1) - b).abs().max() > 1e-3


def test_learned_path_is_unchanged():
    model = build_vit("vit_tiny", depth=1, patch_size=8, img_size=32)
    assert model.rope is None and model.pos_embed.shape == (1, 17, 192)
    keys = set(model.state_dict())
    assert not any("rope" in key for key in keys)
    assert all(block.norm1.eps == 1e-6 for block in model.blocks) and model.norm.eps == 1e-6
    eps_model = DinoVisionTransformer(model.config.with_overrides(layer_norm_eps=1e-5))
    assert eps_model.norm.eps == 1e-5 and eps_model.blocks[0].norm2.eps == 1e-5


def test_graph_export_refuses_a_rope_backbone():
    from franca.export.wrappers import ExportableBackbone

    model = build_vit("vit_tiny", depth=1, patch_size=8, img_size=32, position_encoding="rope")
    with pytest.raises(ValueError, match="this one uses RoPE \\(DINOv3\\)"):
        ExportableBackbone(model, (32, 32))
