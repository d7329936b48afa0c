"""scripts/modify_ckpt_highres.py: only pos_embed changes, and a model built at the new size matches the old one."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from franca.models.vision_transformer import DinoVisionTransformer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "modify_ckpt_highres.py"
_spec = importlib.util.spec_from_file_location("modify_ckpt_highres", SCRIPT)
highres = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(highres)

DIM = 48


def tiny_vit(img_size: int) -> DinoVisionTransformer:
    return DinoVisionTransformer(img_size=img_size, patch_size=14, embed_dim=DIM, depth=2, num_heads=3).eval()


def source_model() -> DinoVisionTransformer:
    torch.manual_seed(0)
    model = tiny_vit(56)
    with torch.no_grad():
        model.pos_embed.normal_()  # unit-variance grid: interpolation differences dominate the outputs
    return model


def release_checkpoint(model: DinoVisionTransformer) -> dict:
    """A training-export-like file: teacher and student copies with prefixes, a head, chunked keys, metadata."""
    backbone = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            key = f"blocks.0.{index}." + key.split(".", 2)[2]  # chunked naming, one chunk
        backbone[f"backbone.{key}"] = tensor.clone()
    head = {"dino_head.last_layer.weight": torch.randn(8, DIM)}
    student = {k: v + 1 for k, v in backbone.items()}
    return {"teacher": {**backbone, **head}, "student": student, "iteration": 1234, "note": "hrft"}


def flat_backbone_state(section: dict) -> dict:
    state = {}
    for key, tensor in section.items():
        if key.startswith("backbone."):
            key = key[len("backbone.") :]
            if key.startswith("blocks.0."):
                key = "blocks." + key[len("blocks.0.") :]
            state[key] = tensor
    return state


def run_script(tmp_path, checkpoint, *extra) -> dict:
    source, target = tmp_path / "in.pth", tmp_path / "out.pth"
    torch.save(checkpoint, source)
    argv = ["--checkpoint-path", str(source), "--output-path", str(target), *extra]
    assert highres.main(argv) == 0
    return torch.load(target, weights_only=True)


def test_offset_sampling_gives_exactly_the_target_grid():
    """floor(M · (T + 0.1)/M) = T in double precision for every grid pair; F.interpolate agrees on the size."""
    for side in range(1, 65):
        for target in range(1, 129):
            assert math.floor(side * ((target + 0.1) / side)) == target
    for side in (4, 16, 37):
        for target in (1, 3, 16, 37, 74):
            scale = (target + 0.1) / side
            out = F.interpolate(torch.zeros(1, 1, side, side), scale_factor=(scale, scale), mode="bicubic")
            assert out.shape[-2:] == (target, target)


def test_only_pos_embed_changes(tmp_path):
    checkpoint = release_checkpoint(source_model())
    result = run_script(tmp_path, checkpoint, "--target-img-size", "98")
    assert result["iteration"] == 1234 and result["note"] == "hrft"
    changed = []
    for section in ("teacher", "student"):
        assert sorted(result[section]) == sorted(checkpoint[section])
        for key, tensor in checkpoint[section].items():
            if torch.equal(tensor, result[section][key]) and tensor.dtype == result[section][key].dtype:
                continue
            changed.append(f"{section}/{key}")
            assert result[section][key].shape == (1, 1 + 7 * 7, DIM)
    assert changed == ["teacher/backbone.pos_embed", "student/backbone.pos_embed"]


def test_model_built_at_the_new_size_matches_the_old_model_run_at_that_size(tmp_path):
    old = source_model()
    result = run_script(tmp_path, release_checkpoint(old), "--target-img-size", "98", "--patch-size", "14")
    new = tiny_vit(98)
    new.load_state_dict(flat_backbone_state(result["teacher"]), strict=True)
    images = torch.randn(2, 3, 98, 98)
    with torch.no_grad():
        expected, got = old.forward_features(images), new.forward_features(images)
    assert torch.equal(expected["x_norm_patchtokens"], got["x_norm_patchtokens"])
    assert torch.equal(expected["x_norm_clstoken"], got["x_norm_clstoken"])
    # the original script's resize (size=, antialias=True) starts the new model from other embeddings
    grid = old.pos_embed[:, 1:].reshape(1, 4, 4, DIM).permute(0, 3, 1, 2)
    original = F.interpolate(grid, size=(7, 7), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 49, -1)
    assert (original - new.pos_embed[:, 1:]).abs().max() > 1e-2


def test_shrinking_a_flat_bfloat16_checkpoint_in_place(tmp_path):
    """Flat keys, an exact --pos-embed-key, bfloat16 kept, output written over the input, no temp file left."""
    model = source_model()
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save(state, path)
    argv = ["--checkpoint-path", str(path), "--output-path", str(path), "--target-img-size", "42"]
    assert highres.main([*argv, "--pos-embed-key", "pos_embed"]) == 0
    result = torch.load(path, weights_only=True)
    assert result["pos_embed"].dtype == torch.bfloat16 and result["pos_embed"].shape == (1, 10, DIM)
    small = tiny_vit(42)
    small.load_state_dict({k: v.float() for k, v in result.items()})
    probe = torch.empty(1, 10, DIM, dtype=torch.bfloat16)
    old = model.to(torch.bfloat16)
    assert torch.equal(old.interpolate_pos_encoding(probe, 42, 42), small.pos_embed.to(torch.bfloat16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--target-img-size", "500"], "not a positive multiple of --patch-size 14"),
        (["--pos-embed-key", "encoder.pos_embed"], "no key 'encoder.pos_embed'"),
    ],
)
def test_bad_arguments_give_clear_errors(tmp_path, capsys, extra, message):
    source = tmp_path / "in.pth"
    torch.save({"pos_embed": torch.zeros(1, 17, DIM)}, source)
    with pytest.raises(SystemExit):
        highres.main(["--checkpoint-path", str(source), "--output-path", str(tmp_path / "out.pth"), *extra])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.pth").exists()


def test_missing_checkpoint_and_unsafe_pickle_are_refused(tmp_path, capsys):
    missing = tmp_path / "absent.pth"
    with pytest.raises(SystemExit):
        highres.main(["--checkpoint-path", str(missing), "--output-path", str(tmp_path / "out.pth")])
    assert "no such file" in capsys.readouterr().err
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"pos_embed": torch.zeros(1, 17, DIM), "callback": Path("x")}, unsafe)
    with pytest.raises(SystemExit):
        highres.main(["--checkpoint-path", str(unsafe), "--output-path", str(tmp_path / "out.pth")])
    assert "weights-only" in capsys.readouterr().err
