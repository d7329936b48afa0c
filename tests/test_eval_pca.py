"""PCA pictures: the foreground step on an oracle two-region feature map and on emoji-like and microscopy-like
images, the colours against a NumPy PCA, and the PNG grids and JSON of the command line on real photos."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from skimage import data as skdata

from franca.data.image_decoding import ImageDecoding
from franca.eval import pca
from franca.eval.lib.common import EvalSettings
from franca.eval.lib.feature_pca import foreground_mask, otsu_threshold, pca_rgb
from franca.eval.lib.pictures import GAP
from franca.eval.pca import PCASettings, pca_pictures
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


@pytest.mark.parametrize("method", ["border", "pc1"])
def test_foreground_of_two_region_map_and_sign_invariance(method):
    features, foreground = two_region_features()
    rgb, found = pca_rgb(features, foreground=method)
    assert np.array_equal(found.numpy(), foreground)
    assert rgb[~found].abs().max() == 0  # background is black
    fg = rgb[found]
    assert fg.min() >= 0 and fg.max() <= 1
    _, found_negated = pca_rgb(-features, foreground=method)  # a sign flip of the features changes nothing
    assert np.array_equal(found_negated.numpy(), foreground)
    _, nothing_is_background = pca_rgb(features, threshold=1.0, foreground="pc1")
    assert nothing_is_background.all()


def test_otsu_threshold_equals_a_brute_force_search():
    values = torch.tensor([0.1, 0.12, 0.5, 0.52, 0.55, 0.9, 0.91, 0.3])
    ordered = sorted(values.tolist())

    def between(split):
        low, high = np.array(ordered[:split]), np.array(ordered[split:])
        return len(low) * len(high) * (low.mean() - high.mean()) ** 2

    best = max(range(1, len(ordered)), key=between)
    assert otsu_threshold(values) == pytest.approx((ordered[best - 1] + ordered[best]) / 2)
    assert otsu_threshold(torch.full((5,), 0.3)) == pytest.approx(0.3)  # uniform: nothing lies above


def emoji_like(seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A flat-coloured shape with a dark eye on a transparent canvas, composited onto white as the datasets do;
    and its object mask."""
    colours = [(255, 204, 77), (221, 46, 68), (85, 172, 238), (120, 177, 89), (244, 144, 12)]
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    fill, margin = colours[seed % len(colours)] + (255,), 5 + seed % 3
    box = (margin, margin, size - margin, size - margin)
    [draw.ellipse, lambda b, fill: draw.rounded_rectangle(b, radius=12, fill=fill)][seed % 2](box, fill=fill)
    draw.ellipse((size // 3 - 4, size // 3 - 4, size // 3 + 4, size // 3 + 4), fill=(60, 40, 30, 255))
    return np.asarray(ImageDecoding().to_rgb(image)), np.asarray(image)[..., 3] > 0


def microscopy_like(seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Four bright Gaussian nuclei on a dark, noisy field (grey); and the mask where a nucleus is above 30%."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    intensity = np.zeros((size, size))
    for _ in range(4):
        (cy, cx), radius = rng.uniform(12, size - 12, 2), rng.uniform(7, 11)
        intensity = np.maximum(intensity, np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (radius / 1.6) ** 2)))
    grey = np.clip(intensity * 230 + rng.normal(8, 4, (size, size)), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2), intensity > 0.3


def patch_pixels(images: list[np.ndarray], patch: int = 8) -> torch.Tensor:
    """Features that see only the pixels: each patch's normalised pixels, flattened ([N, H/p, W/p, 3p²])."""
    x = (torch.from_numpy(np.stack(images)).float() / 255 - torch.tensor([0.485, 0.456, 0.406])) / 0.226
    n, height, width, _ = x.shape
    x = x.reshape(n, height // patch, patch, width // patch, patch, 3).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, height // patch, width // patch, -1)


@pytest.mark.parametrize("make", [emoji_like, microscopy_like])
def test_border_foreground_finds_objects_on_non_photographic_images(make):
    images, masks = zip(*(make(seed) for seed in range(8)))
    masks = torch.from_numpy(np.stack(masks)).float()
    truth = masks.reshape(8, 8, 8, 8, 8).mean(dim=(2, 4)) >= 0.5  # a patch is object when most of it is
    found = foreground_mask(patch_pixels(list(images)), "border")
    assert (found == truth).float().mean() >= 0.93
    assert abs(found.float().mean() - truth.float().mean()) <= 0.06
    assert found.flatten(1).any(dim=1).all()  # no image is all background


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
    scale = record["panel_scale"]
    assert scale == 4  # 32 px panels are enlarged to 128, a readable size
    header = first.size[1] - 2 * 32 * scale - GAP
    assert header > 0 and first.size[0] >= 6 * 48 * scale + 5 * GAP
    assert second.size[1] == header + 32 * scale
    image_cell = np.asarray(second)[header : header + 32 * scale : scale, : 48 * scale : scale]
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
