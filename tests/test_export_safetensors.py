"""safetensors export: the folder format, and a bit-exact round trip through franca.hub.load_backbone."""

import json

import pytest
import torch

pytest.importorskip("safetensors", reason="safetensors export tests need the safetensors package")

from safetensors.torch import load_file  # noqa: E402

from franca.export.safetensors import backbone_config, export_safetensors, main  # noqa: E402
from franca.hub import load_backbone  # noqa: E402
from franca.models import ViTConfig, build_vit  # noqa: E402
from franca.models.rasa_head import RASAHead  # noqa: E402
from franca.models.vision_transformer import DinoVisionTransformer  # noqa: E402

VIT_KEYWORDS = set(ViTConfig.field_names())


def tiny_vit(with_rasa: bool = False, **overrides) -> DinoVisionTransformer:
    torch.manual_seed(0)
    kwargs = {"img_size": 56, "patch_size": 14, "embed_dim": 48, "depth": 2, "num_heads": 3, **overrides}
    model = DinoVisionTransformer(**kwargs)
    if with_rasa:
        model.attach_rasa_head(RASAHead(48, n_pos_layers=2))
    return model.eval()


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_round_trip_through_the_hub_is_bit_exact(tmp_path):
    model = tiny_vit(with_rasa=True)
    folder = export_safetensors(model, tmp_path / "export")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "rasa_head.safetensors"]
    loaded = load_backbone(folder, rasa_weights=folder / "rasa_head.safetensors").eval()
    assert_same_tensors(model.state_dict(), loaded.state_dict())
    images = torch.randn(2, 3, 42, 70)
    with torch.no_grad():
        expected = model.forward_features(images, use_rasa_head=True)
        got = loaded.forward_features(images, use_rasa_head=True)
    for key in ("x_norm_clstoken", "x_norm_patchtokens", "patch_token_rasa"):
        assert torch.equal(expected[key], got[key])


def test_folder_contents_follow_the_documented_format(tmp_path):
    model = tiny_vit(with_rasa=True)
    folder = export_safetensors(model, tmp_path / "export")
    config = json.loads((folder / "config.json").read_text())
    assert set(config) == VIT_KEYWORDS | {"arch"}
    assert config["arch"] is None  # depth 2 and dim 48 are no named architecture
    assert DinoVisionTransformer(**{k: v for k, v in config.items() if k != "arch"}).state_dict().keys() == {
        k for k in model.state_dict() if not k.startswith("rasa_head.")
    }
    weights = load_file(str(folder / "model.safetensors"))
    assert "blocks.1.mlp.w12.weight" in weights and not any(k.startswith("rasa_head.") for k in weights)
    rasa = load_file(str(folder / "rasa_head.safetensors"))
    assert sorted(rasa) == ["pos_pred.weight", "pre_pos_layers.0.weight", "pre_pos_layers.1.weight"]
    assert torch.equal(rasa["pos_pred.weight"], model.rasa_head.pos_pred.weight)


def test_config_of_a_released_architecture():
    with torch.device("meta"):
        model = build_vit("vit_large", img_size=518)
    assert backbone_config(model) == {
        "arch": "vit_large",
        "img_size": 518,
        "patch_size": 14,
        "in_chans": 3,
        "embed_dim": 1024,
        "depth": 24,
        "num_heads": 16,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "proj_bias": True,
        "ffn_bias": True,
        "ffn_layer": "swiglufused",
        "layerscale": 1e-5,
        "drop_path_rate": 0.0,
        "drop_path_uniform": True,
        "num_register_tokens": 0,
        "interpolate_offset": 0.1,
        "interpolate_antialias": False,
        "layer_norm_eps": 1e-6,
        "position_encoding": "learned",
        "rope_base": 100.0,
        "rope_normalize_coords": "separate",
    }


def test_non_default_architecture_round_trips(tmp_path):
    model = tiny_vit(
        ffn_layer="mlp",
        mlp_ratio=3.0,
        qkv_bias=False,
        ffn_bias=False,
        layerscale=None,
        num_register_tokens=2,
        interpolate_offset=0.0,
    )
    loaded = load_backbone(export_safetensors(model, tmp_path / "export")).eval()
    assert backbone_config(loaded) == backbone_config(model)
    assert_same_tensors(model.state_dict(), loaded.state_dict())


def test_bfloat16_weights_are_written_unchanged(tmp_path):
    model = tiny_vit().to(torch.bfloat16)
    folder = export_safetensors(model, tmp_path / "export")
    assert_same_tensors(model.state_dict(), load_file(str(folder / "model.safetensors")))


def test_cli_re_export_is_identical_and_drops_a_stale_rasa_file(tmp_path, capsys):
    first = export_safetensors(tiny_vit(with_rasa=True), tmp_path / "first")
    second = tmp_path / "second"
    export_safetensors(tiny_vit(with_rasa=True), second)
    assert main(["--weights", str(first), "--out", str(second)]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    assert not (second / "rasa_head.safetensors").exists()  # no --rasa-weights: the folder describes a plain backbone
    assert_same_tensors(load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors")))
    assert (first / "config.json").read_text() == (second / "config.json").read_text()
    third = tmp_path / "third"
    assert (
        main(["--weights", str(first), "--rasa-weights", str(first / "rasa_head.safetensors"), "--out", str(third)])
        == 0
    )
    assert_same_tensors(
        load_file(str(first / "rasa_head.safetensors")), load_file(str(third / "rasa_head.safetensors"))
    )


def test_cli_keeps_or_overrides_the_recorded_decoding(tmp_path, capsys):
    model = tiny_vit()
    model.input_decoding = {"alpha_background": "black", "image_max_value": 0.0}
    first = export_safetensors(model, tmp_path / "first")
    assert main(["--weights", str(first), "--out", str(tmp_path / "kept")]) == 0
    assert "decoding alpha background black, image max value 0 (each image's range) (the checkpoint's)" in (
        capsys.readouterr().out
    )
    assert json.loads((tmp_path / "kept" / "config.json").read_text())["input_decoding"] == model.input_decoding
    assert main(["--weights", str(first), "--out", str(tmp_path / "grey"), "--alpha-background", "#808080"]) == 0
    config = json.loads((tmp_path / "grey" / "config.json").read_text())
    assert config["input_decoding"] == {"alpha_background": "#808080", "image_max_value": 0.0}
    assert load_backbone(tmp_path / "grey").input_decoding == config["input_decoding"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "grey" / "model.safetensors"), "pt") as handle:
        header = handle.metadata()
    assert json.loads(header["franca.input_decoding"]) == config["input_decoding"]
    assert json.loads(header["franca.metadata"])["command"].startswith("python -m franca.export.safetensors")


def test_cli_reports_missing_weights_file(tmp_path, capsys):
    missing = tmp_path / "absent.pth"
    with pytest.raises(SystemExit):
        main(["--weights", str(missing), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert str(missing) in err and "no such file" in err
    assert not (tmp_path / "out").exists()
