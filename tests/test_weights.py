"""ViTConfig and the weights adapter (franca.models.config, franca.models.weights) and the generic torch.hub entry."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from franca.checkpoint.distributed import CheckpointMismatchError, model_and_optimizer_state
from franca.checkpoint.release import save_teacher_release
from franca.export.safetensors import export_safetensors
from franca.models import DinoVisionTransformer, ViTConfig
from franca.models.weights import (
    WeightsMismatchError,
    check_fits,
    fit_pos_embed,
    from_release,
    infer_config,
    load_strict,
    to_release,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
# 96 wide with 4 heads: reading the keys alone would guess 96 / 64 → no integer, so the stored config must be used.
ODD_HEADS = dict(img_size=56, patch_size=14, embed_dim=96, depth=2, num_heads=4)
TINY = dict(img_size=56, patch_size=14, embed_dim=128, depth=4, num_heads=2)


def randomised(config: ViTConfig, seed: int = 0) -> DinoVisionTransformer:
    """A ViT whose every parameter matters for the outputs (LayerScale near 1, unit-variance grid and tokens)."""
    torch.manual_seed(seed)
    model = DinoVisionTransformer(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.uniform_(0.5, 1.5)
            elif name in ("pos_embed", "cls_token", "mask_token"):
                param.normal_()
    return model.eval()


def tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval().forward_features(images)["x_prenorm"]


def assert_same_outputs(a: nn.Module, b: nn.Module, images: torch.Tensor) -> None:
    torch.testing.assert_close(tokens(a, images), tokens(b, images), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# ViTConfig


def test_model_to_config_to_model_gives_identical_outputs():
    config = ViTConfig(**ODD_HEADS, ffn_layer="mlp", mlp_ratio=3.0, num_register_tokens=2, layerscale=None)
    source = randomised(config)
    rebuilt = DinoVisionTransformer(ViTConfig.from_dict(json.loads(json.dumps(source.build_config()))))
    rebuilt.load_state_dict(source.state_dict())
    assert rebuilt.config == config
    assert_same_outputs(source, rebuilt, torch.randn(2, 3, 42, 70))


def test_keyword_construction_equals_config_construction():
    assert DinoVisionTransformer(**TINY).config == DinoVisionTransformer(ViTConfig(**TINY)).config == ViTConfig(**TINY)
    with pytest.raises(TypeError, match=r"not both"):
        DinoVisionTransformer(ViTConfig(), depth=2)


def test_stored_dict_has_the_export_keys_and_reads_back():
    stored = ViTConfig.for_arch("vit_large", img_size=518, drop_path_rate=0.3).inference().to_dict()
    assert stored["arch"] == "vit_large" and stored["drop_path_rate"] == 0.0
    assert set(stored) == {"arch", *(f for f in ViTConfig.field_names())}
    assert ViTConfig.from_dict(stored) == ViTConfig.for_arch("vit_large", img_size=518)


def test_older_stored_dicts_and_unknown_keys():
    # a backbone_config written before drop_path_* were stored: missing fields take the defaults
    old = {"arch": "vit_base", "img_size": 224, "patch_size": 14, "ffn_layer": "swiglufused"}
    assert ViTConfig.from_dict(old) == ViTConfig(img_size=224, embed_dim=768, depth=12, num_heads=12)
    with pytest.raises(ValueError, match=r"unknown ViT field\(s\) \['block_chunks'\] in my.pth's config.*remove"):
        ViTConfig.from_dict({**old, "block_chunks": 4}, source="my.pth's config")
    with pytest.raises(ValueError, match=r"arch='vit_huge'"):
        ViTConfig.from_dict({"arch": "vit_huge"})
    with pytest.raises(TypeError, match=r"unknown ViT field\(s\) \['depht'\]"):
        ViTConfig().with_overrides(depht=3)


def test_from_student_config_reads_every_student_key():
    student = OmegaConf.create(
        dict(
            arch="vit_small",
            embed_dim=64,
            depth=0,
            num_heads=4,
            patch_size=16,
            drop_path_rate=0.3,
            layerscale=1e-5,
            drop_path_uniform=False,
            ffn_layer="mlp",
            mlp_ratio=3.0,
            qkv_bias=False,
            proj_bias=True,
            ffn_bias=False,
            num_register_tokens=4,
            interpolate_antialias=True,
            interpolate_offset=0.0,
            layer_norm_eps=1e-5,
            position_encoding="rope",
            rope_base=50.0,
            rope_normalize_coords="max",
        )
    )
    expected = ViTConfig(
        img_size=96,
        patch_size=16,
        embed_dim=64,
        depth=12,
        num_heads=4,
        ffn_layer="mlp",
        mlp_ratio=3.0,
        layerscale=1e-5,
        drop_path_rate=0.3,
        drop_path_uniform=False,
        qkv_bias=False,
        proj_bias=True,
        ffn_bias=False,
        num_register_tokens=4,
        interpolate_offset=0.0,
        interpolate_antialias=True,
        layer_norm_eps=1e-5,
        position_encoding="rope",
        rope_base=50.0,
        rope_normalize_coords="max",
    )
    assert ViTConfig.from_student_config(student, img_size=96) == expected
    assert ViTConfig.from_student_config(student, img_size=96, drop_path=False).drop_path_rate == 0.0


def test_infer_config_reads_the_shapes():
    config = ViTConfig(**TINY, num_register_tokens=3, ffn_bias=False)
    assert infer_config(DinoVisionTransformer(config).state_dict()) == config
    odd = ViTConfig(**ODD_HEADS)
    with pytest.raises(ValueError, match=r"num_heads= explicitly"):
        infer_config(DinoVisionTransformer(odd).state_dict())
    assert infer_config(DinoVisionTransformer(odd).state_dict(), num_heads=4) == odd


# ---------------------------------------------------------------------------------------------------------------------
# The adapter against hand-written key maps


def small_flat_state() -> dict[str, torch.Tensor]:
    """Four blocks with one tensor each, plus the non-block keys: values are their own block index."""
    state = {"cls_token": torch.full((1,), -1.0)}
    state.update({f"blocks.{i}.norm1.weight": torch.full((1,), float(i)) for i in range(4)})
    state["norm.weight"] = torch.full((1,), 9.0)
    return state


def test_to_release_chunks_blocks_as_written_by_hand():
    release = to_release(small_flat_state(), block_chunks=2)
    assert list(release) == [
        "backbone.cls_token",
        "backbone.blocks.0.0.norm1.weight",
        "backbone.blocks.0.1.norm1.weight",
        "backbone.blocks.1.2.norm1.weight",
        "backbone.blocks.1.3.norm1.weight",
        "backbone.norm.weight",
    ]
    assert list(to_release(small_flat_state(), block_chunks=0, prefix="")) == list(small_flat_state())


@pytest.mark.parametrize(
    "layout",
    [
        {"teacher": {"backbone.blocks.1.3.norm1.weight": 3, "dino_head.w": 7, "backbone.cls_token": -1}},
        {"model": {"module.backbone._orig_mod.blocks.3.norm1.weight": 3, "module.backbone.cls_token": -1}},
        {"state_dict": {"_orig_mod.blocks.3.norm1.weight": 3, "cls_token": -1, "ibot_head.w": 7}},
        {  # a training checkpoint: the teacher is taken, the student left out
            "iteration": 5,
            "model": {
                "student.backbone.blocks.3.norm1.weight": 0,
                "student.backbone.cls_token": 0,
                "teacher.backbone.blocks.1.3.norm1.weight": 3,
                "teacher.backbone.cls_token": -1,
                "teacher.dino_head.w": 7,
            },
        },
    ],
)
def test_from_release_maps_every_layout_to_flat_keys(layout):
    def as_tensors(tree):
        return {k: as_tensors(v) if isinstance(v, dict) else torch.tensor([float(v)]) for k, v in tree.items()}

    backbone, rasa = from_release(as_tensors(layout))
    assert rasa == {}
    assert {k: v.item() for k, v in backbone.items()} == {"blocks.3.norm1.weight": 3.0, "cls_token": -1.0}


def test_from_release_inverts_to_release_and_splits_rasa():
    state = small_flat_state()
    release = to_release(state, block_chunks=4)
    release["backbone.rasa_head.pos_pred.weight"] = torch.ones(2, 1)
    backbone, rasa = from_release({"teacher": release})
    assert list(backbone) == list(state) and all(torch.equal(backbone[k], state[k]) for k in state)
    assert list(rasa) == ["pos_pred.weight"]


def test_position_grid_resize_equals_the_model_run_at_the_new_size():
    source = randomised(ViTConfig(**TINY))  # grid 4
    target = ViTConfig(**{**TINY, "img_size": 98})  # grid 7
    weights, _ = from_release({"teacher": to_release(source.state_dict())}, config=target)
    assert weights["pos_embed"].shape == (1, 1 + 7 * 7, 128)
    resized = DinoVisionTransformer(target)
    load_strict(resized, weights, "the resized release")
    assert_same_outputs(source, resized, torch.randn(2, 3, 98, 98))
    assert fit_pos_embed(source.pos_embed, 4) is source.pos_embed


# ---------------------------------------------------------------------------------------------------------------------
# The one error format


def test_one_error_format_names_source_and_every_kind_of_mismatch():
    model = nn.ModuleDict({"a": nn.Linear(3, 2), "b": nn.LayerNorm(2)})
    state = {"a.weight": torch.zeros(2, 4), "a.bias": torch.zeros(2), "b.weight": torch.ones(2), "c": torch.zeros(1)}
    with pytest.raises(WeightsMismatchError) as info:
        load_strict(model, state, "/ckpt/x.pth", "the probe", hint="use the matching config")
    assert str(info.value) == (
        "checkpoint /ckpt/x.pth does not fit the probe: 1 missing keys ['b.bias']; 1 unexpected keys ['c']; "
        "1 shape mismatches ['a.weight: checkpoint (2, 4) vs model (2, 3)']. use the matching config"
    )
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=r"^checkpoint r.pth does not fit .*1 missing keys \['b.bias'\]"):
        check_fits(shapes, {k: v for k, v in shapes.items() if k != "b.bias"}, "r.pth", error=CheckpointMismatchError)
    check_fits(shapes, shapes, "r.pth")


@pytest.mark.slow
def test_load_pretrained_backbone_uses_the_same_format():
    from franca.train.ssl_meta_arch import SSLMetaArch

    holder = SSLMetaArch.__new__(SSLMetaArch)
    nn.Module.__init__(holder)
    holder.student = nn.ModuleDict({"backbone": DinoVisionTransformer(ViTConfig(**TINY))})
    holder.teacher = nn.ModuleDict({"backbone": DinoVisionTransformer(ViTConfig(**TINY))})
    other = DinoVisionTransformer(ViTConfig(**{**TINY, "depth": 3}))
    with pytest.raises(WeightsMismatchError, match=r"^checkpoint w.pth does not fit the configured backbone.*missing"):
        holder.load_pretrained_backbone({"teacher": to_release(other.state_dict(), block_chunks=3)}, "w.pth")
    source = randomised(ViTConfig(**{**TINY, "img_size": 28}))
    holder.load_pretrained_backbone({"teacher": to_release(source.state_dict(), block_chunks=2)}, "w.pth")
    for which in (holder.student, holder.teacher):
        assert_same_outputs(source, which["backbone"], torch.randn(1, 3, 56, 56))


# ---------------------------------------------------------------------------------------------------------------------
# Any checkpoint through torch.hub


def hub_load(path) -> DinoVisionTransformer:
    return torch.hub.load(str(REPO_ROOT), "franca_from_checkpoint", source="local", weights=str(path))


def test_hub_entry_loads_a_release_with_backbone_config(tmp_path):
    source = randomised(ViTConfig(**ODD_HEADS))
    path = save_teacher_release(
        {"backbone." + k: v for k, v in source.state_dict().items()},
        source.build_config(),
        tmp_path / "teacher_checkpoint.pth",
        block_chunks=2,
    )
    loaded = hub_load(path)
    assert loaded.config == source.config
    assert_same_outputs(source, loaded, torch.randn(1, 3, 28, 42))


def test_hub_entry_loads_the_teacher_of_a_training_checkpoint(tmp_path):
    def pair(seed):
        return nn.ModuleDict({"backbone": randomised(ViTConfig(**TINY), seed), "dino_head": nn.Linear(128, 4)})

    meta_arch = nn.ModuleDict({"student": pair(1), "teacher": pair(2)})
    optimizer = torch.optim.AdamW(meta_arch["student"].parameters())
    path = tmp_path / "model_0000010.pth"
    torch.save({"iteration": 10, **model_and_optimizer_state(meta_arch, optimizer)}, path)
    loaded = hub_load(path)
    assert_same_outputs(meta_arch["teacher"]["backbone"], loaded, torch.randn(1, 3, 42, 42))


def test_hub_entry_loads_a_safetensors_export(tmp_path):
    pytest.importorskip("safetensors")
    source = randomised(ViTConfig(**ODD_HEADS, num_register_tokens=1))
    loaded = hub_load(export_safetensors(source, tmp_path / "export"))
    assert loaded.config == source.config
    assert_same_outputs(source, loaded, torch.randn(1, 3, 56, 28))
