"""Core ML export: conversion of a tiny ViT and the saved package's interface (predictions need macOS)."""

import json
from pathlib import Path

import pytest
import torch

ct = pytest.importorskip("coremltools", reason="Core ML export tests need coremltools (pip install coremltools)")

from franca.export.coreml import export_coreml, main  # noqa: E402
from franca.export.safetensors import export_safetensors  # noqa: E402
from franca.models.rasa_head import RASAHead  # noqa: E402
from franca.models.vision_transformer import DinoVisionTransformer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:coremltools")

DIM = 48
FLOAT32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32


def tiny_vit(with_rasa: bool = False) -> DinoVisionTransformer:
    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=DIM, depth=2, num_heads=3)
    if with_rasa:
        model.attach_rasa_head(RASAHead(DIM, n_pos_layers=2))
    return model.eval()


def interface(path: Path) -> tuple[dict, dict]:
    """{name: (shape, dtype)} of the inputs and outputs, read from the saved package's spec."""
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()

    def describe(features):
        return {f.name: (list(f.type.multiArrayType.shape), f.type.multiArrayType.dataType) for f in features}

    return describe(spec.description.input), describe(spec.description.output)


def weight_bytes(package: Path) -> int:
    return sum(f.stat().st_size for f in package.rglob("*.bin"))


@pytest.mark.slow
def test_conversion_with_rasa_has_named_outputs_of_the_right_shapes(tmp_path):
    path = export_coreml(tiny_vit(with_rasa=True), tmp_path / "vit.mlpackage", (42, 70), batch_size=2)
    inputs, outputs = interface(path)
    assert inputs == {"images": ([2, 3, 42, 70], FLOAT32)}
    n = (42 // 14) * (70 // 14)
    assert outputs == {
        "cls_token": ([2, DIM], FLOAT32),
        "patch_tokens": ([2, n, DIM], FLOAT32),
        "patch_tokens_rasa": ([2, n, DIM], FLOAT32),
    }


@pytest.mark.slow
def test_cli_fp16_halves_the_stored_weights(tmp_path, capsys):
    model = tiny_vit()
    folder = export_safetensors(model, tmp_path / "weights")
    fp32 = export_coreml(model, tmp_path / "fp32.mlpackage", (56, 56))
    fp16 = tmp_path / "fp16.mlpackage"
    assert main(["--weights", str(folder), "--fp16", "--out", str(fp16)]) == 0  # 56 px: the checkpoint's size
    printed = capsys.readouterr().out
    assert "wrote" in printed and "sizes: image 56x56 (the checkpoint's img_size)" in printed
    metadata = ct.models.MLModel(str(fp16), skip_model_load=True).user_defined_metadata
    assert json.loads(metadata["franca.input_decoding"]) == {"alpha_background": "white", "image_max_value": 0.0}
    assert json.loads(metadata["franca.metadata"])["sizes"]["image_size"] == [56, 56]
    inputs, outputs = interface(fp16)
    assert inputs == {"images": ([1, 3, 56, 56], FLOAT32)}
    assert outputs == {"cls_token": ([1, DIM], FLOAT32), "patch_tokens": ([1, 16, DIM], FLOAT32)}
    assert weight_bytes(fp16) < 0.6 * weight_bytes(fp32)


@pytest.mark.parametrize(
    "image_size,out_name,message",
    [
        (["56", "50"], "model.mlpackage", "is not divisible by the backbone's patch size 14"),
        (["56", "56"], "model.onnx", "saved as a .mlpackage folder"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path, capsys, image_size, out_name, message):
    folder = export_safetensors(tiny_vit(), tmp_path / "weights")
    out = tmp_path / out_name
    with pytest.raises(SystemExit):
        main(["--weights", str(folder), "--image-size", *image_size, "--out", str(out)])
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_reports_missing_weights_file(tmp_path, capsys):
    missing = tmp_path / "absent.pth"
    with pytest.raises(SystemExit):
        main(["--weights", str(missing), "--image-size", "56", "56", "--out", str(tmp_path / "m.mlpackage")])
    err = capsys.readouterr().err
    assert str(missing) in err and "no such file" in err
