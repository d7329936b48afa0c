"""ONNX export: onnxruntime outputs against the PyTorch backbone, fixed and dynamic sizes, with and without RASA."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need onnxruntime (pip install franca[export])")
onnx = pytest.importorskip("onnx", reason="ONNX export tests need onnx (pip install franca[export])")
pytest.importorskip("onnxscript", reason="ONNX export tests need onnxscript (pip install franca[export])")

import franca.export.onnx as onnx_export  # noqa: E402
from franca.export.onnx import export_onnx, main  # noqa: E402
from franca.export.safetensors import export_safetensors  # noqa: E402
from franca.export.wrappers import bicubic_resize_matrix  # noqa: E402
from franca.models.rasa_head import RASAHead  # noqa: E402
from franca.models.vision_transformer import DinoVisionTransformer  # noqa: E402

DIM, PATCH = 48, 14
ATOL = 1e-4


def tiny_vit(img_size: int = 56, with_rasa: bool = False) -> DinoVisionTransformer:
    """Two-block ViT; a unit-variance position grid makes any interpolation error visible in the outputs."""
    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=img_size, patch_size=PATCH, embed_dim=DIM, depth=2, num_heads=3)
    with torch.no_grad():
        model.pos_embed.normal_()
    if with_rasa:
        model.attach_rasa_head(RASAHead(DIM, n_pos_layers=3))
    return model.eval()


def expected_outputs(model, images, with_rasa):
    with torch.no_grad():
        out = model.forward_features(images, use_rasa_head=with_rasa)
    names = ["x_norm_clstoken", "x_norm_patchtokens"] + (["patch_token_rasa"] if with_rasa else [])
    return [out[name].numpy() for name in names]


def run_session(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session, session.run(None, {"images": images.numpy()})


def op_types(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def keys_weights(t: float) -> list[float]:
    """Keys' cubic convolution kernel (a = -0.75) at distances 1+t, t, 1-t, 2-t, in float64."""
    a = -0.75

    def kernel(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        if x < 2:
            return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
        return 0.0

    return [kernel(1 + t), kernel(t), kernel(1 - t), kernel(2 - t)]


def reference_matrix(out_size: int, in_size: int, offset: float | None) -> np.ndarray:
    """Brute-force float64 bicubic resampling matrix, half-pixel centres, edge-clamped taps."""
    inverse_scale = in_size / (out_size + offset) if offset is not None else in_size / out_size
    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        src = (i + 0.5) * inverse_scale - 0.5
        base = math.floor(src)
        for tap, weight in enumerate(keys_weights(src - base)):
            matrix[i, min(max(base - 1 + tap, 0), in_size - 1)] += weight
    return matrix


@pytest.mark.parametrize(
    "out_size,in_size,offset", [(7, 4, 0.1), (3, 4, 0.1), (40, 37, 0.1), (16, 37, 0.1), (5, 16, None), (9, 4, None)]
)
def test_bicubic_matrix_matches_float64_reference(out_size, in_size, offset):
    """Float64 maths up to the float32 rounding of the source coordinate (an ulp of ~37 moves a weight by ~5e-6)."""
    offset_tensor = None if offset is None else torch.tensor(offset, dtype=torch.float64)
    matrix = bicubic_resize_matrix(out_size, in_size, offset_tensor, torch.tensor(False))
    np.testing.assert_allclose(matrix.double().numpy(), reference_matrix(out_size, in_size, offset), atol=1e-5)


def test_bicubic_matrix_is_identity_at_construction_size():
    matrix = bicubic_resize_matrix(16, 16, torch.tensor(0.1, dtype=torch.float64), torch.tensor(True))
    assert torch.equal(matrix, torch.eye(16))


@pytest.mark.parametrize("out_hw", [(7, 5), (40, 20), (3, 16)])
def test_matrix_resize_reproduces_runtime_interpolation(out_hw):
    """A_h · G · A_wᵀ equals the model's F.interpolate(scale_factor=(h0 + 0.1)/M) grid, which size= would not."""
    side, (h0, w0) = 16, out_hw
    grid = torch.randn(1, 8, side, side)
    offset, native = torch.tensor(0.1, dtype=torch.float64), torch.tensor(False)
    rows, cols = bicubic_resize_matrix(h0, side, offset, native), bicubic_resize_matrix(w0, side, offset, native)
    ours = torch.einsum("hm,cmn,wn->chw", rows, grid[0], cols)
    runtime = F.interpolate(grid, scale_factor=((h0 + 0.1) / side, (w0 + 0.1) / side), mode="bicubic")[0]
    assert (ours - runtime).abs().max() < 1e-5
    by_size = F.interpolate(grid, size=(h0, w0), mode="bicubic")[0]
    assert (by_size - runtime).abs().max() > 1e-2


@pytest.mark.slow
def test_fixed_size_export_with_rasa(tmp_path):
    model = tiny_vit(with_rasa=True)
    path = export_onnx(model, tmp_path / "fixed.onnx", (42, 70))
    assert "Resize" not in op_types(path)
    images = torch.randn(1, 3, 42, 70)
    session, got = run_session(path, images)
    assert [o.name for o in session.get_outputs()] == ["cls_token", "patch_tokens", "patch_tokens_rasa"]
    assert [o.shape for o in session.get_outputs()] == [[1, DIM], [1, 15, DIM], [1, 15, DIM]]
    expected = expected_outputs(model, images, with_rasa=True)
    for g, e in zip(got, expected, strict=True):
        assert np.abs(g - e).max() <= ATOL
    assert np.abs(got[2] - got[1]).max() > 1e-2  # the RASA output really is debiased


@pytest.mark.slow
def test_dynamic_size_export_matches_at_several_sizes(tmp_path):
    model = tiny_vit(with_rasa=True)
    path = export_onnx(model, tmp_path / "dynamic.onnx", (56, 42), dynamic_batch=True, dynamic_size=True)
    assert "Resize" not in op_types(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, (height, width) in [(1, (56, 56)), (3, (42, 70)), (2, (98, 28)), (1, (28, 28))]:
        images = torch.randn(batch, 3, height, width)
        got = session.run(None, {"images": images.numpy()})
        for g, e in zip(got, expected_outputs(model, images, with_rasa=True), strict=True):
            assert g.shape == e.shape
            assert np.abs(g - e).max() <= ATOL, (height, width)


@pytest.mark.slow
def test_dynamic_size_graph_refuses_sizes_off_the_patch_grid_like_the_model(tmp_path):
    """30x30 with patch 4: the strided convolution alone would run it on a 7x7 grid; model and graph refuse it."""
    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=32, patch_size=4, embed_dim=DIM, depth=1, num_heads=3).eval()
    with pytest.raises(ValueError, match="30x30 is not divisible by the patch size 4"):
        model.forward_features(torch.randn(1, 3, 30, 30))

    path = export_onnx(model, tmp_path / "dynamic.onnx", (32, 32), dynamic_size=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.randn(1, 3, 28, 36)
    got = session.run(None, {"images": images.numpy()})
    for g, e in zip(got, expected_outputs(model, images, with_rasa=False), strict=True):
        assert np.abs(g - e).max() <= ATOL
    for height, width in [(30, 30), (28, 30), (30, 28), (33, 32)]:
        with pytest.raises(Exception, match="image height and width must be multiples of the patch size 4"):
            session.run(None, {"images": np.zeros((1, 3, height, width), dtype=np.float32)})


@pytest.mark.slow
def test_fixed_size_graph_accepts_only_its_size(tmp_path):
    model = tiny_vit()
    path = export_onnx(model, tmp_path / "fixed.onnx", (56, 56))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="invalid dimensions"):
        session.run(None, {"images": np.zeros((1, 3, 57, 56), dtype=np.float32)})


@pytest.mark.slow
def test_cli_dynamic_size_checks_the_refusal(tmp_path, capsys, monkeypatch):
    folder = export_safetensors(tiny_vit(), tmp_path / "weights")
    args = ["--weights", str(folder), "--image-size", "56", "42", "--dynamic-size", "--out", str(tmp_path / "d.onnx")]
    assert main(args) == 0
    assert "refuses 57x42: not a multiple of the patch size 14" in capsys.readouterr().out

    monkeypatch.setattr(onnx_export, "_refuse_sizes_off_the_patch_grid", lambda graph, patch_size: None)
    assert main(args) == 1
    assert "accepts an image size that is not a multiple of 14" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_fixed_size_without_rasa(tmp_path, capsys):
    model = tiny_vit()
    folder = export_safetensors(model, tmp_path / "weights")
    out = tmp_path / "cli.onnx"
    assert main(["--weights", str(folder), "--image-size", "56", "56", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max abs error" in printed and "verified" in printed
    images = torch.randn(1, 3, 56, 56)
    session, got = run_session(out, images)
    assert [o.name for o in session.get_outputs()] == ["cls_token", "patch_tokens"]
    for g, e in zip(got, expected_outputs(model, images, with_rasa=False), strict=True):
        assert np.abs(g - e).max() <= ATOL


def test_cli_rejects_image_size_not_divisible_by_patch(tmp_path, capsys):
    folder = export_safetensors(tiny_vit(), tmp_path / "weights")
    with pytest.raises(SystemExit):
        main(["--weights", str(folder), "--image-size", "50", "56", "--out", str(tmp_path / "x.onnx")])
    assert "is not divisible by the backbone's patch size 14" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.slow
def test_cli_takes_the_checkpoint_s_size_and_records_its_decoding(tmp_path, capsys):
    model = tiny_vit(img_size=42)
    model.input_decoding = {"alpha_background": "black", "image_max_value": 4095.0}
    folder = export_safetensors(model, tmp_path / "weights")
    out = tmp_path / "trained.onnx"
    assert main(["--weights", str(folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        "sizes: image 42x42 (the checkpoint's img_size); decoding alpha background black, image max value 4095"
        in printed
    )
    graph = onnx.load(str(out))
    assert [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 42, 42]
    props = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(props["franca.input_decoding"]) == {"alpha_background": "black", "image_max_value": 4095.0}
    metadata = json.loads(props["franca.metadata"])
    assert metadata["command"] == f"python -m franca.export.onnx --weights {folder} --out {out}"
    assert metadata["sizes"] == {"image_size": [42, 42], "image_size_from": "the checkpoint's img_size"}
    assert metadata["weights"]["sha256"] and metadata["input_decoding"]["from"] == "the checkpoint's"
    assert main(["--weights", str(folder), "--out", str(out), "--alpha-background", "white"]) == 0
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["franca.input_decoding"])["alpha_background"] == "white"


def test_cli_reports_missing_weights_file(tmp_path, capsys):
    missing = tmp_path / "absent.pth"
    with pytest.raises(SystemExit):
        main(["--weights", str(missing), "--image-size", "56", "56", "--out", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert str(missing) in err and "no such file" in err
