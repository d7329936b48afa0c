"""DINOv3 ViTs (RoPE, storage tokens, patch 16) in the layouts of transformers and timm load into franca and give
the libraries' own outputs (random weights, fp32), and franca's evaluation commands run on them."""

import json

import pytest
import torch
from interop_helpers import max_differences, randomise_

from franca.hub import load_backbone

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
from timm.models._hub import save_for_hf  # noqa: E402

TOLERANCE = 1e-4
SHAPES = {"S/16": (384, 6), "B/16": (768, 12)}
SIZES = ((96, 96), (64, 112))  # any size: RoPE has no native grid
FULL_SIZES = ((224, 224), (160, 256))


def transformers_dinov3(folder, width, heads, depth, gated=False, seed=0):
    config = transformers.DINOv3ViTConfig(
        hidden_size=width,
        num_attention_heads=heads,
        num_hidden_layers=depth,
        intermediate_size=(8 * width) // 3 // 8 * 8 if gated else 4 * width,
        num_register_tokens=4,
        use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu",
    )
    model = randomise_(transformers.DINOv3ViTModel(config), seed).eval()
    model.save_pretrained(folder)
    return lambda x: model(pixel_values=x).last_hidden_state


def timm_dinov3(folder, name, seed=0, **overrides):
    model = randomise_(timm.create_model(name, pretrained=False, num_classes=0, **overrides), seed).eval()
    save_for_hf(model, folder)
    return model.forward_features


def assert_same_tokens(theirs, folder, sizes=SIZES, tolerance=TOLERANCE):
    ours = load_backbone(folder).eval()
    assert ours.config.uses_rope and ours.patch_size == 16 and ours.num_register_tokens == 4
    for size in sizes:
        x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
        with torch.no_grad():
            tokens, features = theirs(x), ours.forward_features(x)
        cls, patches = max_differences(tokens, features, registers=4)
        assert tokens.abs().max() > 0.5  # the outputs compared are not near zero
        assert max(cls, patches) <= tolerance, (size, cls, patches)
    return ours


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.slow
def test_transformers_dinov3(shape, tmp_path):
    width, heads = SHAPES[shape]
    theirs = transformers_dinov3(tmp_path, width, heads, depth=2)
    ours = assert_same_tokens(theirs, tmp_path)
    assert ours.config.layer_norm_eps == 1e-5 and ours.config.rope_base == 100.0
    assert ours.blocks[0].attn.qkv.bias.view(3, -1)[1].abs().max() == 0  # DINOv3 has no key bias


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "vit_base_patch16_dinov3"])
@pytest.mark.slow
def test_timm_dinov3(name, tmp_path):
    theirs = timm_dinov3(tmp_path, name, depth=2)
    ours = assert_same_tokens(theirs, tmp_path)
    assert not ours.config.qkv_bias and ours.config.embed_dim == SHAPES[name.split("_")[1][0].upper() + "/16"][0]


@pytest.mark.slow
@pytest.mark.parametrize("shape", list(SHAPES))
def test_full_depth_dinov3_in_both_layouts(shape, tmp_path):
    width, heads = SHAPES[shape]
    assert_same_tokens(transformers_dinov3(tmp_path / "hf", width, heads, depth=12), tmp_path / "hf", FULL_SIZES)
    name = {"S/16": "vit_small_patch16_dinov3", "B/16": "vit_base_patch16_dinov3"}[shape]
    assert_same_tokens(timm_dinov3(tmp_path / "timm", name), tmp_path / "timm", FULL_SIZES)


@pytest.mark.slow
def test_qkv_bias_and_gated_variants_both_layouts(tmp_path):
    theirs = timm_dinov3(tmp_path / "qkvb", "vit_small_patch16_dinov3_qkvb", depth=2)
    assert load_backbone(tmp_path / "qkvb").config.qkv_bias
    assert_same_tokens(theirs, tmp_path / "qkvb", sizes=((64, 96),))
    theirs = timm_dinov3(tmp_path / "plus", "vit_small_plus_patch16_dinov3", depth=2)
    assert load_backbone(tmp_path / "plus").config.ffn_layer == "swiglufused"
    assert_same_tokens(theirs, tmp_path / "plus", sizes=((64, 96),))
    theirs = transformers_dinov3(tmp_path / "gated", 128, 4, depth=2, gated=True)
    assert_same_tokens(theirs, tmp_path / "gated", sizes=((64, 96),))


def test_evaluation_commands_run_on_a_dinov3_folder(tmp_path):
    from eval_data import make_photo_folders

    from franca.eval import knn, pca

    transformers_dinov3(tmp_path / "dinov3", 64, 4, depth=1)
    train, val = make_photo_folders(tmp_path / "photos", n_train=2, n_val=1)
    common = ["--weights", str(tmp_path / "dinov3"), "--batch-size", "4", "--num-workers", "0", "--image-size", "32"]
    knn.main([*common, "--output-dir", str(tmp_path / "knn"), "--train-dataset", train, "--val-dataset", val])
    record = json.loads((tmp_path / "knn" / "results_eval_knn.json").read_text())
    assert 0 <= record["10"]["top1"] <= 100
    image = next((tmp_path / "photos" / "val").rglob("*.png"))
    pca.main([*common, "--output-dir", str(tmp_path / "pca"), "--images", str(image)])
    assert (tmp_path / "pca" / "results_eval_pca.json").is_file()
