"""PCA pictures: the foreground step on an oracle two-region feature map, the colours against a NumPy PCA, and the
PNG grids and JSON of the command line on real photos."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from franca.eval import pca
from franca.eval.common import EvalSettings
from franca.eval.pca import GAP, HEADER_HEIGHT, PCASettings, pca_pictures, pca_rgb
from franca.models.vision_transformer import build_vit


def two_region_features(n: int = 3, size: int = 7, dim: int = 16, seed: int = 0):
    """Patch features: a centre square (foreground) near one vector, the rest (touching the border) near another."""
    rng = np.random.default_rng(seed)
    foreground_vector, background_vector = rng.normal(size=dim) * 3, rng.normal(size=dim) * 3
    foreground = np.zeros((n, size, size), bool)
    foreground[:, 2:5, 1:4] = True
    features = np.where(foreground[..., None], foreground_vector, background_vector)
    features = features + 0.05 * rng.normal(size=features.shape)
    return torch.from_numpy(features).float(), foreground


def numpy_pca_minmax(x: np.ndarray, n: int = 3) -> np.ndarray:
    """Independent reference: projections on the top ``n`` principal axes, each min-max scaled to [0, 1]."""
    centred = x - x.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred)
    axes = eigenvectors[:, np.argsort(eigenvalues)[::-1][:n]]
    projected = centred @ axes
    return (projected - projected.min(0)) / (projected.max(0) - projected.min(0))


def assert_equal_up_to_flip(actual: np.ndarray, expected: np.ndarray):
    for c in range(expected.shape[1]):
        error = min(np.abs(actual[:, c] - expected[:, c]).max(), np.abs(actual[:, c] - (1 - expected[:, c])).max())
        assert error < 1e-4, f"channel {c} differs from the reference PCA by {error}"


def test_foreground_of_two_region_map_and_sign_invariance():
    features, foreground = two_region_features()
    rgb, found = pca_rgb(features)
    assert np.array_equal(found.numpy(), foreground)
    assert rgb[~found].abs().max() == 0  # background is black
    fg = rgb[found]
    assert fg.min() >= 0 and fg.max() <= 1
    _, found_negated = pca_rgb(-features)  # the sign of a principal component is arbitrary; the result is not
    assert np.array_equal(found_negated.numpy(), foreground)
    _, nothing_is_background = pca_rgb(features, threshold=1.0)
    assert nothing_is_background.all()


def test_colours_match_a_numpy_pca():
    rng = np.random.default_rng(1)
    features = torch.from_numpy(rng.normal(size=(2, 5, 6, 10)) * np.linspace(3, 0.5, 10)).float()
    rgb, found = pca_rgb(features, remove_background=False)
    assert found.all()
    assert_equal_up_to_flip(rgb.reshape(-1, 3).double().numpy(), numpy_pca_minmax(features.reshape(-1, 10).numpy()))

    two_region, _ = two_region_features(seed=2)
    rgb, found = pca_rgb(two_region)
    x = two_region.reshape(-1, 16).double().numpy()[found.reshape(-1).numpy()]
    assert_equal_up_to_flip(rgb[found].double().numpy(), numpy_pca_minmax(x))  # second PCA: foreground only


def test_pictures_and_command_line_on_real_photos(tmp_path, capsys):
    paths = []
    for name in ("astronaut", "coffee", "chelsea"):
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(getattr(skdata, name)()).save(paths[-1])
    weights = tmp_path / "vit.pth"
    torch.manual_seed(0)
    torch.save(build_vit("vit_tiny", depth=2, patch_size=8, img_size=32).state_dict(), weights)
    record = pca.main(
        [
            "--weights", str(weights), "--images", *map(str, paths), "--output-dir", str(tmp_path / "out"),
            "--input-size", "32", "48", "--rows-per-grid", "2",
        ]
    )  # fmt: skip
    assert record["feature_dims"] == [192, 96, 48, 24, 12]
    assert record["columns"] == ["image", "full (192)", "first 96", "first 48", "first 24", "first 12"]
    assert record["grids"] == ["pca_grid_000.png", "pca_grid_001.png"]
    written = json.loads((tmp_path / "out" / "results_eval_pca.json").read_text())
    assert written["grids"] == record["grids"] and written["images"] == list(map(str, paths))
    first, second = (Image.open(tmp_path / "out" / name) for name in record["grids"])
    assert first.size == (6 * 48 + 5 * GAP, HEADER_HEIGHT + 2 * 32 + GAP)
    assert second.size == (6 * 48 + 5 * GAP, HEADER_HEIGHT + 32)
    image_cell = np.asarray(second)[HEADER_HEIGHT:, :48]
    expected = np.asarray(Image.open(paths[2]).convert("RGB").resize((48, 32), Image.BILINEAR)).astype(int)
    assert np.abs(image_cell.astype(int) - expected).mean() < 8  # the first column shows the resized photo
    assert "pca features [3/3] eta" in capsys.readouterr().out


def test_pictures_reject_bad_slices_and_sizes(tmp_path):
    vit = build_vit("vit_tiny", depth=1, patch_size=8, img_size=32)
    image = Image.fromarray(skdata.rocket())
    with pytest.raises(ValueError, match=r"slices \[300\] are not feature counts in \(0, 192\]"):
        pca_pictures(vit, [image], tmp_path, EvalSettings((32, 32)), PCASettings(slices=[300]), torch.device("cpu"))
    with pytest.raises(ValueError, match="not divisible by the backbone's patch size 8"):
        pca_pictures(vit, [image], tmp_path, EvalSettings((30, 32)), device=torch.device("cpu"))
