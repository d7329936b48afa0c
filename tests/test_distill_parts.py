"""The parts of distillation on their own: patch-grid alignment, head shapes read off weights, the timm backbone and
its round trips through the hub and the exports (training.md, "Distil")."""

import pytest
import torch
from torch import nn

from franca.checkpoint import save_teacher_release
from franca.export.wrappers import exportable
from franca.hub import franca_from_checkpoint
from franca.layers.head_spec import HeadSpec
from franca.layers.heads import build_head
from franca.layers.patch_grid import fit_to_patch, resize_patch_tokens
from franca.models.safetensors_folder import export_safetensors
from franca.models.timm_backbone import TimmBackbone
from franca.models.weights import load_strict
from franca.train.health import HealthMonitor, reduce_stats, spread_stats

pytest.importorskip("timm")
TIMM_TEST_MODEL = "test_resnet"  # timm's 0.37M-parameter ResNet for tests; its own stride is 32


# ---------------------------------------------------------------------------------------------------------------------
# Patch grids


def centre_coordinates(rows: int, cols: int, patch: int) -> torch.Tensor:
    """Tokens [1, rows·cols, 2] whose features are the pixel coordinates (y, x) of their patch centre."""
    y = (torch.arange(rows, dtype=torch.float64) + 0.5) * patch
    x = (torch.arange(cols, dtype=torch.float64) + 0.5) * patch
    grid = torch.stack(torch.meshgrid(y, x, indexing="ij"), dim=-1)
    return grid.reshape(1, rows * cols, 2)


@pytest.mark.parametrize(
    "teacher_patch, student_patch, size",
    [(14, 16, 224), (16, 14, 224), (4, 8, 32)],
    ids=["vit14_to_vit16", "vit16_to_vit14", "vit4_to_cnn_stride8"],
)
def test_resized_teacher_tokens_describe_the_student_cells(teacher_patch, student_patch, size):
    """A teacher token map holding each patch's centre coordinates, resized to the student's grid, holds the student
    cells' centres: the grids line up on the image (no half-cell shift, no transposition). Bilinear interpolation
    reproduces a linear function exactly away from the borders, where edge clamping bends it."""
    source, target = (size // teacher_patch,) * 2, (size // student_patch,) * 2
    resized = resize_patch_tokens(centre_coordinates(*source, teacher_patch), source, target)
    expected = centre_coordinates(*target, student_patch)
    assert resized.shape == expected.shape
    inner = (expected >= 1.5 * teacher_patch) & (expected <= size - 1.5 * teacher_patch)
    inner = inner.all(dim=-1)
    assert inner.sum() >= 4
    assert torch.allclose(resized[inner], expected[inner], atol=1e-6)


def test_from_a_grid_twice_as_fine_every_teacher_token_reaches_a_student_token():
    """A CNN's stride 32 against patch 14 (224 px: 16 x 16 -> 7 x 7): each teacher token moves the result."""
    tokens = torch.zeros(1, 16 * 16, 1, dtype=torch.float64)
    for index in range(16 * 16):
        bumped = tokens.clone()
        bumped[0, index] = 1.0
        assert resize_patch_tokens(bumped, (16, 16), (7, 7)).abs().sum() > 0.01, index


def test_resizing_a_constant_map_keeps_it_and_equal_grids_are_untouched():
    tokens = torch.full((2, 16 * 16, 3), 0.25)
    assert torch.allclose(resize_patch_tokens(tokens, (16, 16), (14, 14)), torch.full((2, 14 * 14, 3), 0.25))
    same = torch.randn(2, 9, 4)
    assert resize_patch_tokens(same, (3, 3), (3, 3)) is same


def test_crops_off_the_teacher_patch_are_resized_to_its_nearest_multiple():
    assert fit_to_patch(torch.rand(2, 3, 96, 96), 14).shape[-2:] == (98, 98)  # 96 px local crops, patch 14
    images = torch.rand(2, 3, 224, 224)
    assert fit_to_patch(images, 14) is images


# ---------------------------------------------------------------------------------------------------------------------
# Head shapes


@pytest.mark.parametrize(
    "kind, nesting, mode",
    [("matryoshka", [4, 8, 16, 32], "slice"), ("matryoshka", [8, 16, 32], "project"), ("dino", None, "slice")],
)
def test_a_head_spec_read_off_weights_rebuilds_the_head(kind, nesting, mode):
    head = build_head(kind, 32, 64, 24, 12, 3, nesting_list=nesting, input_mode=mode, l2_norm=True)
    spec = HeadSpec.from_state_dict(head.state_dict(), in_dim=32)
    rebuilt = spec.build(l2_norm=True)
    load_strict(rebuilt, head.state_dict(), "the head")
    x = torch.randn(5, 32)
    assert all(torch.equal(a, b) for a, b in zip(head(x), rebuilt(x), strict=True))
    narrower = spec.for_width(16).build(l2_norm=True)
    assert narrower.out_dims == head.out_dims  # the student's level l predicts the teacher's level-l targets
    assert [o.shape[-1] for o in narrower(torch.randn(5, 16))] == head.out_dims


def test_a_width_the_nesting_does_not_scale_to_is_refused():
    spec = HeadSpec.from_state_dict(build_head("matryoshka", 32, 64, 24, 12, 3).state_dict(), in_dim=32)
    with pytest.raises(ValueError, match="do not scale to a student of width 20"):
        spec.for_width(20)


# ---------------------------------------------------------------------------------------------------------------------
# timm backbone


def timm_student(patch_size: int = 8, embed_dim: int = 24) -> TimmBackbone:
    torch.manual_seed(0)
    return TimmBackbone.for_stride(TIMM_TEST_MODEL, embed_dim, patch_size, img_size=32).eval()


def test_timm_backbone_has_the_vit_feature_dictionary_at_its_stride():
    model = timm_student(patch_size=8)
    assert model.config.output_stride == 8  # rebuilt with timm's output_stride: its own stride is 32
    out = model.forward_features(torch.randn(2, 3, 32, 48))
    assert out["x_norm_clstoken"].shape == (2, 24)
    assert out["x_norm_patchtokens"].shape == (2, 4 * 6, 24)
    assert out["x_norm_regtokens"].shape == (2, 0, 24) and out["x_prenorm"].shape == (2, 25, 24)
    layer_norm = nn.functional.layer_norm(out["x_prenorm"], (24,), model.norm.weight, model.norm.bias, 1e-6)
    assert torch.allclose(out["x_norm_clstoken"], layer_norm[:, 0])
    assert torch.allclose(out["x_prenorm"][:, 0], out["x_prenorm"][:, 1:].mean(dim=1), atol=1e-6)  # pooled tokens
    ((patches, cls),) = model.get_intermediate_layers(torch.randn(1, 3, 32, 32), 1, return_class_token=True)
    assert patches.shape == (1, 16, 24) and cls.shape == (1, 24)
    assert timm_student(patch_size=32).config.output_stride is None  # its own stride: no rebuild
    with pytest.raises(ValueError, match="multiples of the stride 8"):
        model.forward_features(torch.randn(1, 3, 30, 32))


def test_a_stride_timm_cannot_build_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="student.patch_size"):
        TimmBackbone.for_stride(TIMM_TEST_MODEL, 24, 4, img_size=32)


def test_a_missing_timm_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm":
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(ImportError, match=r"pip install 'franca\[timm\]'"):
        TimmBackbone.for_stride(TIMM_TEST_MODEL, 24, 8, img_size=32)


def test_timm_student_round_trips_through_the_release_file_and_safetensors(tmp_path):
    model = timm_student()
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    path = save_teacher_release(state, model.build_config(), tmp_path / "student.pth", block_chunks=0)
    images = torch.randn(2, 3, 32, 32)
    expected = model.forward_features(images)
    for source in (path, export_safetensors(model, tmp_path / "folder")):
        loaded = franca_from_checkpoint(source).eval()
        assert isinstance(loaded, TimmBackbone)
        got = loaded.forward_features(images)
        assert torch.equal(got["x_norm_clstoken"], expected["x_norm_clstoken"])
        assert torch.equal(got["x_norm_patchtokens"], expected["x_norm_patchtokens"])


def test_timm_student_export_wrapper_returns_the_features():
    model = timm_student()
    images = torch.randn(2, 3, 32, 32)
    cls, patches = exportable(model)(images)
    expected = model.forward_features(images)
    assert torch.equal(cls, expected["x_norm_clstoken"]) and torch.equal(patches, expected["x_norm_patchtokens"])


@pytest.mark.slow
def test_timm_student_exports_to_onnx_and_matches(tmp_path):
    pytest.importorskip("onnxruntime")
    from franca.export.onnx import export_onnx, verify_onnx

    model = timm_student()
    path = export_onnx(model, tmp_path / "student.onnx", (32, 32), dynamic_batch=True)
    errors = verify_onnx(path, model, [(32, 32)], batch_size=3)
    assert max(errors.values()) < 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# Health: the student's spread


def test_the_student_spread_is_reduced_and_its_collapse_warned():
    same = torch.ones(6, 4)
    stats = reduce_stats(
        {"teacher_cls_spread": spread_stats(torch.randn(6, 4)), "student_cls_spread": spread_stats(same)}
    )
    assert stats["student_cls_spread"] == pytest.approx(0.0, abs=1e-6) and stats["teacher_cls_spread"] > 0.3
    monitor = HealthMonitor(patience=0)
    warnings = monitor.update(stats, iteration=5)
    assert len(warnings) == 1 and "student's CLS features have collapsed" in warnings[0]
    assert "distill.center_momentum" in warnings[0]
