"""Optimizer parameter groups (franca.train.param_groups) on a real small ViT and a head, against the original rules."""

import pytest
import torch
from torch import nn

from franca.models import DinoVisionTransformer
from franca.train.param_groups import apply_optim_schedule, fuse_params_groups, get_params_groups

DEPTH = 4


def _tiny_vit() -> DinoVisionTransformer:
    return DinoVisionTransformer(embed_dim=192, depth=DEPTH, num_heads=3, patch_size=4, img_size=32)


class _LastLayer(nn.Module):
    """Parameter names of a weight-normed prototype layer: ``weight_g`` and ``weight_v``."""

    def __init__(self, bottleneck: int, prototypes: int):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(prototypes, 1))
        self.weight_v = nn.Parameter(torch.randn(prototypes, bottleneck))


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlps = nn.ModuleList([nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))])
        self.last_layers = nn.ModuleList([_LastLayer(4, 32), _LastLayer(4, 64)])


def _by_name(groups):
    return {g["name"]: g for g in groups}


def test_vit_multipliers_with_layerwise_decay():
    groups = _by_name(get_params_groups(_tiny_vit(), layerwise_decay=0.9, patch_embed_lr_mult=0.2))
    top = 0.9 ** (DEPTH + 1)  # layer 0: 0.9^(n+1-0)
    expected = {
        # name: (lr_multiplier, wd_multiplier)
        "pos_embed": (top, 1.0),
        "cls_token": (top, 1.0),
        "mask_token": (top, 1.0),
        "patch_embed.proj.weight": (top * 0.2, 1.0),
        "patch_embed.proj.bias": (top * 0.2, 0.0),
        "blocks.0.attn.qkv.weight": (0.9 ** (DEPTH + 1 - 1), 1.0),
        "blocks.2.norm1.weight": (0.9 ** (DEPTH + 1 - 3), 0.0),
        "blocks.2.attn.qkv.weight": (0.9 ** (DEPTH + 1 - 3), 1.0),
        "blocks.2.attn.qkv.bias": (0.9 ** (DEPTH + 1 - 3), 0.0),
        "blocks.2.ls1.gamma": (0.9 ** (DEPTH + 1 - 3), 0.0),
        "blocks.2.mlp.w12.weight": (0.9 ** (DEPTH + 1 - 3), 1.0),
        "blocks.3.ls2.gamma": (0.9 ** (DEPTH + 1 - 4), 0.0),
        "norm.weight": (1.0, 0.0),
        "norm.bias": (1.0, 0.0),
    }
    for name, (lr_mult, wd_mult) in expected.items():
        assert groups[name]["lr_multiplier"] == pytest.approx(lr_mult, rel=1e-12), name
        assert groups[name]["wd_multiplier"] == wd_mult, name
        assert groups[name]["is_last_layer"] is False
    assert groups["blocks.2.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.81)
    assert set(groups) == {name for name, _ in _tiny_vit().named_parameters()}


def test_vit_without_layerwise_decay_keeps_only_the_patch_embed_multiplier():
    for group in get_params_groups(_tiny_vit()):
        expected = 0.2 if group["name"].startswith("patch_embed.") else 1.0
        assert group["lr_multiplier"] == pytest.approx(expected), group["name"]


def test_frozen_parameters_are_skipped():
    vit = _tiny_vit()
    vit.pos_embed.requires_grad_(False)
    vit.blocks[1].requires_grad_(False)
    names = {g["name"] for g in get_params_groups(vit)}
    assert "pos_embed" not in names and not any(n.startswith("blocks.1.") for n in names)
    assert "blocks.0.norm1.weight" in names and "cls_token" in names


def test_head_multipliers_and_last_layer_flag():
    groups = _by_name(get_params_groups(_Head(), layerwise_decay=0.9))
    assert {name: g["lr_multiplier"] for name, g in groups.items()} == dict.fromkeys(groups, 1.0)
    assert groups["last_layers.0.weight_g"]["is_last_layer"] and groups["last_layers.1.weight_v"]["is_last_layer"]
    assert groups["last_layers.0.weight_g"]["wd_multiplier"] == 1.0
    assert groups["mlps.0.0.bias"]["wd_multiplier"] == 0.0 and not groups["mlps.0.0.weight"]["is_last_layer"]


class _Wrapped(nn.Module):
    """Inserts a wrapper's component (e.g. ``_fsdp_wrapped_module``) in every parameter name."""

    def __init__(self, attribute: str, inner: nn.Module):
        super().__init__()
        self.add_module(attribute, inner)


class _ChunkedBlocks(nn.Module):
    """DINOv2-style chunks: blocks.{c}.{i} with the global index i, Identity where a chunk has no block."""

    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        chunk0 = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4), nn.Identity(), nn.Identity()])
        chunk1 = nn.ModuleList([nn.Identity(), nn.Identity(), nn.Linear(4, 4), nn.Linear(4, 4)])
        self.blocks = nn.ModuleList([chunk0, chunk1])
        self.norm = nn.LayerNorm(4)


@pytest.mark.parametrize(
    ("wrap", "prefix"),
    [
        (lambda m: nn.ModuleDict({"backbone": m}), "backbone."),
        (lambda m: _Wrapped("_orig_mod", m), "_orig_mod."),
        (
            lambda m: _Wrapped("_fsdp_wrapped_module", _Wrapped("_checkpoint_wrapped_module", m)),
            "_fsdp_wrapped_module._checkpoint_wrapped_module.",
        ),
        (lambda m: _Wrapped("module", nn.ModuleDict({"backbone": m})), "module.backbone."),
    ],
    ids=["backbone", "compile", "fsdp1_checkpoint", "ddp_backbone"],
)
def test_wrapped_names_get_the_same_multipliers(wrap, prefix):
    def multipliers(groups, strip=""):
        return {g["name"].removeprefix(strip): (g["lr_multiplier"], g["wd_multiplier"]) for g in groups}

    wrapped = get_params_groups(wrap(_tiny_vit()), 0.9)
    assert all(g["name"].startswith(prefix) for g in wrapped)
    assert multipliers(wrapped, prefix) == multipliers(get_params_groups(_tiny_vit(), 0.9))


@pytest.mark.slow
def test_torch_compile_names():
    compiled = torch.compile(_tiny_vit())
    groups = _by_name(get_params_groups(compiled, 0.9))
    assert groups["_orig_mod.blocks.2.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.9 ** (DEPTH + 1 - 3))
    assert groups["_orig_mod.pos_embed"]["lr_multiplier"] == pytest.approx(0.9 ** (DEPTH + 1))


def test_chunked_block_names_use_the_global_index():
    groups = _by_name(get_params_groups(_ChunkedBlocks(), layerwise_decay=0.5))
    # 4 blocks: pos_embed 0.5^5, block i: 0.5^(5 - (i + 1)), final norm 0.5^0.
    assert groups["pos_embed"]["lr_multiplier"] == 0.5**5
    assert groups["blocks.0.0.weight"]["lr_multiplier"] == 0.5**4 and groups["blocks.0.0.weight"]["wd_multiplier"] == 1
    assert groups["blocks.0.1.weight"]["lr_multiplier"] == 0.5**3
    assert groups["blocks.1.2.weight"]["lr_multiplier"] == 0.5**2
    assert groups["blocks.1.3.bias"]["lr_multiplier"] == 0.5**1 and groups["blocks.1.3.bias"]["wd_multiplier"] == 0
    assert groups["norm.weight"]["lr_multiplier"] == 1.0


def test_explicit_n_blocks():
    groups = _by_name(get_params_groups(_tiny_vit(), layerwise_decay=0.5, n_blocks=10))
    assert groups["blocks.2.attn.qkv.weight"]["lr_multiplier"] == 0.5 ** (10 + 1 - 3)
    assert groups["norm.weight"]["lr_multiplier"] == 1.0


def test_fuse_groups_by_multipliers_and_last_layer_flag():
    head = _Head()
    fused = fuse_params_groups(get_params_groups(head))
    by_key = {(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]): set(g["names"]) for g in fused}
    assert by_key == {
        (1.0, 1.0, False): {"mlps.0.0.weight", "mlps.0.2.weight"},
        (1.0, 0.0, False): {"mlps.0.0.bias", "mlps.0.2.bias"},
        (1.0, 1.0, True): {f"last_layers.{i}.weight_{s}" for i in (0, 1) for s in "gv"},
    }
    params = dict(head.named_parameters())
    for group in fused:
        assert [id(p) for p in group["params"]] == [id(params[n]) for n in group["names"]]


def test_fused_vit_groups_cover_every_parameter_once():
    vit = _tiny_vit()
    fused = fuse_params_groups(get_params_groups(vit, layerwise_decay=0.9))
    names = [n for g in fused for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in vit.named_parameters())
    # Distinct (lr, wd) pairs: embeddings (wd on), patch_embed weight and bias, each block (wd on / off), final norm.
    assert len(fused) == 1 + 2 + 2 * DEPTH + 1


def test_apply_optim_schedule_on_adamw():
    torch.manual_seed(0)
    vit, head = _tiny_vit(), _Head()
    groups = fuse_params_groups(get_params_groups(vit, 0.9) + get_params_groups(head, 0.9))
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    apply_optim_schedule(optimizer, lr=1e-3, wd=0.04, last_layer_lr=0.0)
    for group in optimizer.param_groups:
        base = 0.0 if group["is_last_layer"] else 1e-3
        assert group["lr"] == pytest.approx(base * group["lr_multiplier"], rel=1e-12, abs=0.0)
        assert group["weight_decay"] == pytest.approx(0.04 * group["wd_multiplier"], rel=1e-12, abs=0.0)
    pos_group = next(g for g in optimizer.param_groups if "pos_embed" in g["names"])
    assert pos_group["lr"] == pytest.approx(1e-3 * 0.9 ** (DEPTH + 1)) and pos_group["weight_decay"] == 0.04
    norm_group = next(g for g in optimizer.param_groups if "norm.weight" in g["names"])
    assert norm_group["lr"] == pytest.approx(1e-3) and norm_group["weight_decay"] == 0.0

    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    for p in list(vit.parameters()) + list(head.parameters()):
        p.grad = torch.ones_like(p)
    optimizer.step()
    after = dict(head.named_parameters())
    assert torch.equal(after["last_layers.0.weight_v"], before["last_layers.0.weight_v"])  # frozen: lr 0
    assert not torch.equal(after["mlps.0.0.weight"], before["mlps.0.0.weight"])


def test_apply_optim_schedule_rejects_plain_optimizers():
    optimizer = torch.optim.AdamW(_Head().parameters())
    with pytest.raises(ValueError, match="param group 0 lacks"):
        apply_optim_schedule(optimizer, 1e-3, 0.04, 1e-3)
