"""python -m rasa.train on a tiny ViT over real photos: debiasing, file format, rounds, resume, bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from franca.models.vision_transformer import build_vit
from franca.utils.config_schema import ConfigError
from rasa.train import main

pytestmark = pytest.mark.slow  # every test here trains or launches ranks

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "hubble_deep_field", "immunohistochemistry")
TINY = Path(__file__).resolve().parents[1] / "configs" / "rasa" / "tiny.yaml"
GRID, DIM, SIDE = 8, 192, 64


def dihedral_crops(images: list[Image.Image], count: int, seed: int) -> torch.Tensor:
    """Normalised random crops under a random rotation by k·90° and flip: content carries no position cue."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    crops = []
    for i in range(count):
        image = torch.from_numpy(np.asarray(images[i % len(images)], dtype=np.float32) / 255).permute(2, 0, 1)
        size = int(torch.randint(SIDE, image.shape[1] + 1, (1,), generator=generator))
        top, left = (int(torch.randint(image.shape[d] - size + 1, (1,), generator=generator)) for d in (1, 2))
        crop = torch.nn.functional.interpolate(image[None, :, top : top + size, left : left + size], (SIDE, SIDE))[0]
        crop = torch.rot90(crop, int(torch.randint(4, (1,), generator=generator)), dims=(1, 2))
        crop = crop.flip(2) if torch.rand(1, generator=generator) < 0.5 else crop
        crops.append((crop - mean) / std)
    return torch.stack(crops)


def least_squares_r2(train_x: np.ndarray, test_x: np.ndarray) -> float:
    """Held-out R² (mean over row and column) of an ordinary least-squares read-out of the grid position."""
    rows, cols = np.meshgrid(np.arange(GRID) / (GRID - 1), np.arange(GRID) / (GRID - 1), indexing="ij")
    target = np.stack([rows.ravel(), cols.ravel()], 1)

    def design(x):
        return np.concatenate([x.reshape(-1, DIM), np.ones((x.shape[0] * GRID * GRID, 1))], 1)

    solution, *_ = np.linalg.lstsq(design(train_x), np.tile(target, (len(train_x), 1)), rcond=None)
    truth = np.tile(target, (len(test_x), 1))
    residual = ((truth - design(test_x) @ solution) ** 2).sum(0)
    return float(np.mean(1 - residual / ((truth - truth.mean(0)) ** 2).sum(0)))


def sequential_removal(weights: list[np.ndarray]) -> np.ndarray:
    """D×D map x ↦ x with each weight's row plane projected out in turn (orthonormal bases by QR)."""
    matrix = np.eye(DIM)
    for weight in weights:
        basis, _ = np.linalg.qr(weight.T.astype(np.float64))
        matrix = matrix @ (np.eye(DIM) - basis @ basis.T)
    return matrix


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    images = []
    for name in PHOTOS:
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((128, 128))
        image.save(folder / f"{name}.png")
        images.append(image)
    return folder, images


@pytest.fixture(scope="module")
def position_coded_vit(photos, tmp_path_factory):
    """A random-init tiny ViT whose patch embedding whitens the photos' patches and whose position embedding is a
    linear code s·((r−½)u + (c−½)v) in two orthonormal directions: position lives in a 2-D subspace, as RASA assumes.
    (A random position embedding spreads position over ~N independent directions, which no rank-4 removal erases.)"""
    torch.manual_seed(0)
    model = build_vit("vit_tiny", depth=2, patch_size=8, img_size=SIDE)
    crops = dihedral_crops(photos[1], 64, seed=5)
    patches = torch.nn.functional.unfold(crops, 8, stride=8).transpose(1, 2).reshape(-1, 192).double()
    values, vectors = torch.linalg.eigh(torch.cov(patches.T))
    whitening = (vectors * values.clamp_min(1e-4 * values.max()).rsqrt()) @ vectors.T
    code = torch.linalg.qr(torch.randn(DIM, 2, dtype=torch.float64))[0].T
    rows, cols = torch.meshgrid(torch.arange(GRID) / (GRID - 1), torch.arange(GRID) / (GRID - 1), indexing="ij")
    with torch.no_grad():
        model.patch_embed.proj.weight.copy_(whitening.float().reshape(DIM, 3, 8, 8))
        model.patch_embed.proj.bias.copy_(-(whitening @ patches.mean(0)).float())
        offsets = torch.stack([rows.reshape(-1) - 0.5, cols.reshape(-1) - 0.5], 1).double()
        model.pos_embed[0, 1:] = (3.0 * offsets @ code).float()
    path = tmp_path_factory.mktemp("vit") / "vit.pth"
    torch.save(model.state_dict(), path)
    return path, model.eval(), code.numpy()


def run(output_dir, weights, images_dir, *overrides):
    return main(
        ["--config-file", str(TINY), "--output-dir", str(output_dir), f"model.weights={weights}",
         f"data.dataset=ImageFolder:root={images_dir}", *overrides]
    )  # fmt: skip


@pytest.fixture(scope="module")
def random_vit(tmp_path_factory):
    """A random-init tiny ViT: its random position embedding makes position linearly readable from the tokens."""
    torch.manual_seed(0)
    model = build_vit("vit_tiny", depth=2, patch_size=8, img_size=SIDE).eval()
    path = tmp_path_factory.mktemp("random_vit") / "vit.pth"
    torch.save(model.state_dict(), path)
    return path, model


@pytest.mark.slow
def test_cross_covariance_rounds_erase_position_of_a_random_vit(random_vit, photos, tmp_path):
    """The issue's check: held-out position R² > 0.5 from the raw tokens, < 0.1 after 2 rounds; hub-loadable file."""
    from franca.hub import load_backbone

    weights, model = random_vit
    out = run(tmp_path, weights, photos[0], "train.regressor=cross_covariance", "train.epochs_per_round=8")
    final = torch.load(out, weights_only=True)
    assert sorted(final) == ["pos_pred.weight", "pre_pos_layers.0.weight"]
    debiasing = load_backbone(weights, rasa_weights=out).eval()
    crops = dihedral_crops(photos[1], 48, seed=9)
    with torch.no_grad():
        raw = model.forward_features(crops)["x_norm_patchtokens"].double().numpy()
        debiased = debiasing.forward_features(crops, use_rasa_head=True)["patch_token_rasa"].double().numpy()
    assert least_squares_r2(raw[:24], raw[24:]) > 0.5
    assert least_squares_r2(debiased[:24], debiased[24:]) < 0.1
    summaries = [json.loads(line) for line in (tmp_path / "rasa_metrics.json").read_text().splitlines()]
    norms = [r["position_covariance_norm"] for r in summaries if "time_s" in r]
    assert len(norms) == 2 and norms[1] < norms[0]  # the second round finds less linear position signal


@pytest.fixture(scope="module")
def trained(position_coded_vit, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("rasa")
    run(out, position_coded_vit[0], photos[0], "train.epochs_per_round=10", "optim.lr=0.1")
    return out


@pytest.mark.slow
def test_head_removes_the_position_code(trained, position_coded_vit, photos):
    _, model, code = position_coded_vit
    with torch.no_grad():
        tokens = model.forward_features(dihedral_crops(photos[1], 48, seed=9))["x_norm_patchtokens"].double().numpy()
    assert least_squares_r2(tokens[:24], tokens[24:]) > 0.5
    final = torch.load(trained / "rasa_head.pth", weights_only=True)
    round_0 = torch.load(trained / "rounds" / "round_0.pth", weights_only=True)
    left = []
    for state in (round_0, final):
        weights = [state[f"pre_pos_layers.{j}.weight"].numpy() for j in range(len(state) - 1)]
        removal = sequential_removal(weights + [state["pos_pred.weight"].numpy()])
        left.append(float(np.sum((code @ removal) ** 2) / 2))  # share of the code's energy left after removal
    assert left[1] < left[0] < 0.6
    assert left[1] < 0.3


def test_output_files_keys_rounds_and_metrics(trained, position_coded_vit):
    from franca.hub import load_backbone

    for k in (0, 1):
        state = torch.load(trained / "rounds" / f"round_{k}.pth", weights_only=True)
        assert sorted(state) == sorted([f"pre_pos_layers.{j}.weight" for j in range(k)] + ["pos_pred.weight"])
        assert all(v.shape == (2, DIM) for v in state.values())
    round_0 = torch.load(trained / "rounds" / "round_0.pth", weights_only=True)
    final = torch.load(trained / "rasa_head.pth", weights_only=True)
    assert torch.equal(final["pre_pos_layers.0.weight"], round_0["pos_pred.weight"])  # round 0's regressor appended
    model = load_backbone(position_coded_vit[0], rasa_weights=trained / "rasa_head.pth")
    x = torch.randn(2, 3, SIDE, SIDE)
    out = model.forward_features(x, use_rasa_head=True)
    removal = torch.from_numpy(
        sequential_removal([final["pre_pos_layers.0.weight"].numpy(), final["pos_pred.weight"].numpy()])
    )
    expected = out["x_norm_patchtokens"].double() @ removal
    torch.testing.assert_close(out["patch_token_rasa"].double(), expected, atol=1e-5, rtol=1e-5)
    records = [json.loads(line) for line in (trained / "rasa_metrics.json").read_text().splitlines()]
    summaries = [r for r in records if "epoch" not in r]
    assert [r["round"] for r in summaries] == [0, 1]
    assert [r["epoch"] for r in records if r["round"] == 0 and "epoch" in r] == list(range(10))
    assert json.loads((trained / "rounds" / "state.json").read_text())["last_finished_round"] == 1


def test_resume_after_round_one_equals_an_uninterrupted_run(position_coded_vit, photos, tmp_path):
    weights, images = position_coded_vit[0], photos[0]
    run(tmp_path / "whole", weights, images, "train.epochs_per_round=1")
    run(tmp_path / "split", weights, images, "train.epochs_per_round=1", "train.end_round=1")
    assert not (tmp_path / "split" / "rounds" / "round_1.pth").exists()
    run(tmp_path / "split", weights, images, "train.epochs_per_round=1")
    whole = torch.load(tmp_path / "whole" / "rasa_head.pth", weights_only=True)
    split = torch.load(tmp_path / "split" / "rasa_head.pth", weights_only=True)
    assert sorted(whole) == sorted(split) and all(torch.equal(whole[k], split[k]) for k in whole)
    with pytest.raises(ConfigError, match="optim.lr"):
        run(tmp_path / "split", weights, images, "train.epochs_per_round=1", "optim.lr=0.5")


def test_bad_inputs_give_clear_errors(position_coded_vit, photos, tmp_path):
    weights, images = position_coded_vit[0], photos[0]
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "not_vit.pth")
    with pytest.raises(ValueError, match="model.weights=.*not a ViT backbone"):
        run(tmp_path / "a", tmp_path / "not_vit.pth", images)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        run(tmp_path / "b", weights, tmp_path / "empty")
    with pytest.raises(ValueError, match="fewer than train.batch_size=64"):
        run(tmp_path / "c", weights, images, "train.batch_size=64")
    with pytest.raises(ConfigError, match="did you mean 'train.end_round'"):
        run(tmp_path / "d", weights, images, "train.end_rounds=3")
    with pytest.raises(ConfigError, match="train.epochs_per_round"):
        run(tmp_path / "e", weights, images, "train.epochs_per_round=two")
    torch.save(build_vit("vit_small", depth=1, patch_size=8, img_size=SIDE).state_dict(), tmp_path / "small.pth")
    torch.save({"pos_pred.weight": torch.zeros(2, DIM)}, tmp_path / "head192.pth")
    with pytest.raises(ValueError, match="embedding size 192.*384"):
        run(
            tmp_path / "f",
            tmp_path / "small.pth",
            images,
            "train.start_round=1",
            f"model.init_head={tmp_path}/head192.pth",
        )


class PatchPixels(torch.nn.Module):
    """A stand-in backbone whose patch tokens are the 8×8×3 pixels of each patch (D = 192)."""

    def forward_features(self, images):
        return {"x_norm_patchtokens": torch.nn.functional.unfold(images, 8, stride=8).transpose(1, 2)}


def test_cross_covariance_round_matches_the_covariance_of_all_tokens(photos):
    """pos_pred = orthonormal rows spanning Cov(x, row), Cov(x, col) over every token of the round (numpy np.cov)."""
    from franca.data.loaders import make_dataset
    from franca.models.rasa_head import RASAHead
    from rasa.config import load_rasa_config
    from rasa.train import _round_loader, cross_covariance_round

    cfg = load_rasa_config(TINY, ["model.weights=x", f"data.dataset=ImageFolder:root={photos[0]}"])
    images, head, cpu = make_dataset(cfg.data.dataset), RASAHead(DIM, n_pos_layers=0), torch.device("cpu")
    record = cross_covariance_round(PatchPixels(), head, images, cfg, 0, cpu)
    tokens = torch.cat(
        [PatchPixels().forward_features(c)["x_norm_patchtokens"] for c in _round_loader(images, cfg, 0, cpu)]
    )
    rows, cols = np.meshgrid(np.arange(GRID) / (GRID - 1), np.arange(GRID) / (GRID - 1), indexing="ij")
    targets = np.tile(np.stack([rows.ravel(), cols.ravel()]), (1, len(tokens)))
    joint = np.cov(np.concatenate([tokens.reshape(-1, DIM).double().numpy().T, targets]), bias=True)
    covariance = joint[DIM:, :DIM]
    rows = head.pos_pred.weight.detach().double().numpy()
    basis, _ = np.linalg.qr(covariance.T)  # the plane of the two covariance rows
    np.testing.assert_allclose(rows.T @ rows, basis @ basis.T, atol=1e-5)
    np.testing.assert_allclose(rows[0], covariance[0] / np.linalg.norm(covariance[0]), atol=1e-5)
    assert record[0]["position_covariance_norm"] == pytest.approx(np.linalg.norm(covariance), rel=1e-5)
    token_covariance, target_variance = joint[:DIM, :DIM], np.diag(joint)[DIM:]
    units = covariance / np.linalg.norm(covariance, axis=1, keepdims=True)
    correlation = [
        np.linalg.norm(c) / np.sqrt(u @ token_covariance @ u * v) for c, u, v in zip(covariance, units, target_variance)
    ]
    np.testing.assert_allclose(record[0]["position_correlation"], correlation, rtol=1e-5)
    share = np.trace(basis.T @ token_covariance @ basis) / np.trace(token_covariance)
    assert record[0]["plane_variance_share"] == pytest.approx(share, rel=1e-5)


def test_unknown_regressor_is_refused(photos, position_coded_vit, tmp_path):
    with pytest.raises(ConfigError, match="train.regressor has value 'lstsq'.*one of 'trained', 'cross_covariance'"):
        run(tmp_path, position_coded_vit[0], photos[0], "train.regressor=lstsq")


def test_cross_covariance_rows_that_span_no_plane_are_refused():
    from rasa.train import orthonormal_rows

    direction = torch.randn(DIM, dtype=torch.float64)
    rows = orthonormal_rows(torch.stack([direction, torch.randn(DIM, dtype=torch.float64)]), 0)
    torch.testing.assert_close(rows @ rows.T, torch.eye(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="do not span a plane.*train.end_round=3"):
        orthonormal_rows(torch.stack([direction, -2 * direction]), 3)
    with pytest.raises(ValueError, match="do not span a plane"):
        orthonormal_rows(torch.zeros(2, DIM, dtype=torch.float64), 1)


def test_a_state_file_without_newer_keys_still_resumes(position_coded_vit, photos, tmp_path):
    """A state.json written before train.regressor existed counts the missing key as its default."""
    weights, images = position_coded_vit[0], photos[0]
    run(tmp_path, weights, images, "train.epochs_per_round=1", "train.end_round=1")
    state_path = tmp_path / "rounds" / "state.json"
    state = json.loads(state_path.read_text())
    del state["config"]["train"]["regressor"]
    state_path.write_text(json.dumps(state))
    run(tmp_path, weights, images, "train.epochs_per_round=1")
    assert json.loads(state_path.read_text())["last_finished_round"] == 1


def test_a_non_finite_loss_is_reported_by_its_epoch(random_vit, photos, tmp_path):
    """A round whose loss is not finite (here: NaN tokens) stops naming the round and epoch, and saves no head."""
    state = torch.load(random_vit[0], weights_only=True)
    state["pos_embed"][0, 1] = float("nan")
    torch.save(state, tmp_path / "nan_vit.pth")
    with pytest.raises(FloatingPointError, match="RASA round 0 epoch 0: a step's loss is not finite; lower optim.lr"):
        run(tmp_path / "out", tmp_path / "nan_vit.pth", photos[0], "train.epochs_per_round=1")
    assert not (tmp_path / "out" / "rounds" / "round_0.pth").exists()


def test_a_relative_config_path_is_found_from_any_directory(tmp_path, monkeypatch):
    from rasa.train import RASA_CONFIG_DIR, REPOSITORY_ROOT, resolve_config_file

    monkeypatch.chdir(tmp_path)
    assert resolve_config_file("configs/rasa/tiny.yaml") == str(REPOSITORY_ROOT / "configs" / "rasa" / "tiny.yaml")
    assert resolve_config_file("tiny.yaml") == str(RASA_CONFIG_DIR / "tiny.yaml")
    (tmp_path / "configs" / "rasa").mkdir(parents=True)
    (tmp_path / "configs" / "rasa" / "tiny.yaml").write_text("train: {end_round: 1}\n")
    assert resolve_config_file("configs/rasa/tiny.yaml") == "configs/rasa/tiny.yaml"  # the current directory first
    assert resolve_config_file("missing.yaml") == "missing.yaml" and resolve_config_file(None) is None
