"""The ViT backbone against independent float64 computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from franca.layers import swiglu_hidden_dim
from franca.layers.block import Block
from franca.layers.swiglu_ffn import SwiGLUFFN
from franca.models import build_vit


def tiny(**kw):
    torch.manual_seed(0)
    return build_vit("vit_tiny", **{"embed_dim": 48, "depth": 3, "num_heads": 3, "patch_size": 4, "img_size": 16, **kw})


def reference_forward(model, x, masks=None):
    """Float64 re-implementation of the pre-norm ViT from the model's parameters (no module calls)."""
    p = {k: v.double() for k, v in model.state_dict().items()}
    x = x.double()
    B, _, H, W = x.shape
    P, D = model.patch_size, model.embed_dim
    patches = x.unfold(2, P, P).unfold(3, P, P).permute(0, 2, 3, 1, 4, 5).reshape(B, (H // P) * (W // P), -1)
    tokens = patches @ p["patch_embed.proj.weight"].reshape(D, -1).T + p["patch_embed.proj.bias"]
    if masks is not None:
        tokens = torch.where(masks[..., None], p["mask_token"][None], tokens)
    tokens = torch.cat([p["cls_token"].expand(B, 1, D), tokens], dim=1) + p["pos_embed"]
    heads = model.num_heads
    for i in range(len(model.blocks)):
        b = f"blocks.{i}."
        h = F.layer_norm(tokens, (D,), p[b + "norm1.weight"], p[b + "norm1.bias"], 1e-6)
        qkv = (h @ p[b + "attn.qkv.weight"].T + p[b + "attn.qkv.bias"]).reshape(B, -1, 3, heads, D // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads), dim=-1) @ v
        att = att.transpose(1, 2).reshape(B, -1, D) @ p[b + "attn.proj.weight"].T + p[b + "attn.proj.bias"]
        tokens = tokens + p[b + "ls1.gamma"] * att
        h = F.layer_norm(tokens, (D,), p[b + "norm2.weight"], p[b + "norm2.bias"], 1e-6)
        gate, value = (h @ p[b + "mlp.w12.weight"].T + p[b + "mlp.w12.bias"]).chunk(2, dim=-1)
        tokens = tokens + p[b + "ls2.gamma"] * (
            (F.silu(gate) * value) @ p[b + "mlp.w3.weight"].T + p[b + "mlp.w3.bias"]
        )
    return tokens, F.layer_norm(tokens, (D,), p["norm.weight"], p["norm.bias"], 1e-6)


def test_forward_features_matches_float64_reference_with_masks():
    model = tiny(layerscale=0.5).eval()
    x = torch.randn(2, 3, 16, 16)
    masks = torch.rand(2, 16) < 0.4
    with torch.no_grad():
        model.mask_token.normal_()
        out = model.forward_features(x, masks=masks)
    prenorm, normed = reference_forward(model, x, masks)
    assert torch.allclose(out["x_prenorm"].double(), prenorm, atol=1e-5)
    assert torch.allclose(out["x_norm_clstoken"].double(), normed[:, 0], atol=1e-5)
    assert torch.allclose(out["x_norm_patchtokens"].double(), normed[:, 1:], atol=1e-5)
    assert out["x_norm_regtokens"].shape == (2, 0, 48) and out["masks"] is masks
    assert torch.equal(model(x), model.forward_features(x)["x_norm_clstoken"])


def test_registers_sit_between_cls_and_patches_without_position_embeddings():
    model = tiny(num_register_tokens=2).eval()
    out = model.forward_features(torch.randn(1, 3, 16, 20))
    assert out["x_norm_regtokens"].shape == (1, 2, 48) and out["x_norm_patchtokens"].shape == (1, 20, 48)
    tokens = model.prepare_tokens_with_masks(torch.randn(1, 3, 16, 16))
    assert torch.equal(tokens[:, 1:3], model.register_tokens)


def test_list_input_gives_one_dict_per_batch():
    model = tiny().eval()
    a, b = torch.randn(2, 3, 16, 16), torch.randn(3, 3, 8, 8)
    outs = model.forward_features([a, b])
    assert [o["x_norm_patchtokens"].shape[:2] for o in outs] == [(2, 16), (3, 4)]
    assert torch.equal(outs[0]["x_norm_clstoken"], model.forward_features(a)["x_norm_clstoken"])


def test_get_intermediate_layers_against_a_block_loop():
    model = tiny().eval()
    x = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        tokens = model.prepare_tokens_with_masks(x)
        per_block = []
        for blk in model.blocks:
            tokens = blk(tokens)
            per_block.append(model.norm(tokens))
        last_two = model.get_intermediate_layers(x, n=2, return_class_token=True)
        listed = model.get_intermediate_layers(x, n=[0], reshape=True, norm=False)
    for (patches, cls), ref in zip(last_two, per_block[1:], strict=True):
        assert torch.allclose(patches, ref[:, 1:]) and torch.allclose(cls, ref[:, 0])
    assert listed[0].shape == (2, 48, 4, 6)
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(x, n=[5])


def test_image_size_not_divisible_by_patch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"18x16 is not divisible by the patch size 4.*16x16"):
        tiny().forward_features(torch.randn(1, 3, 18, 16))


def test_swiglu_hidden_widths_of_the_releases():
    assert [swiglu_hidden_dim(4 * d) for d in (384, 768, 1024, 1536)] == [1024, 2048, 2736, 4096]
    ffn = SwiGLUFFN(768, 3072)
    assert ffn.w12.weight.shape == (4096, 768) and ffn.w3.weight.shape == (768, 2048)


def test_initialisation_of_reference_section_2_4():
    model = build_vit("vit_small", depth=2, patch_size=14, img_size=224)
    qkv = model.blocks[0].attn.qkv
    assert abs(qkv.weight.std().item() - 0.02) < 0.002  # trunc_normal_ bounds are ±2 absolute, as the original
    assert torch.all(qkv.bias == 0) and torch.all(model.mask_token == 0)
    assert model.cls_token.abs().max() < 1e-4 and abs(model.pos_embed.std().item() - 0.02) < 0.002
    assert torch.all(model.blocks[1].ls2.gamma == 1e-5)


def test_batch_subset_stochastic_depth_updates_only_the_sampled_rows():
    torch.manual_seed(0)
    block = Block(16, 2, torch.nn.Identity(), layerscale=None, drop_path=0.5)
    block.attn.requires_grad_(False)
    x = torch.randn(8, 5, 16)
    block.train()
    y = block(x)
    changed = (y - x).abs().amax(dim=(1, 2)) > 0
    assert 4 <= changed.sum() <= 8  # each branch touches ⌊8 · 0.5⌋ = 4 rows, two branches → 4 to 8 rows
    block.eval()
    assert torch.allclose(block(x), x + block.attn(block.norm1(x)) + block.norm2(x + block.attn(block.norm1(x))))
