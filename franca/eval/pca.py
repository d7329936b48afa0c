"""PCA pictures of patch features (the paper's Figure 3; valeoai/Franca ``visualize_PCA.py``), for the full features and
for Matryoshka slices (the first d channels, d ∈ {D, D/2, …, D/16}; paper arXiv 2507.14137, Sec. 3).

For one image set and one feature slice (:func:`pca_rgb`):
1. Foreground (``--foreground``):
   - ``border`` (default): each image's background is the coordinate-wise median of its border patches' L2-normalised
     features (the outermost patch rows and columns, where most pictures show background); a patch's score is its
     cosine distance to that median, and Otsu's threshold over the image's scores (the split that maximises the
     between-class variance) separates foreground (far from the background) from background. Per image, so a red
     and a yellow object on white are both found, and no image is left all black unless it is uniform. It needs no
     photographic statistics, so it also finds flat-coloured objects on white (emoji, icons) and bright blobs on dark
     (microscopy); an image whose border is mostly object is read the other way round.
   - ``pc1`` (the original ``visualize_PCA.py``): the first principal component of all patch features of the set,
     min-max scaled over the set, marks the background where it exceeds ``--threshold`` (0.35, the original's
     value); its sign is fixed so that the border patches score higher than the set's mean.
2. A second PCA with 3 components on the foreground patches only; each component min-max scaled over the
   foreground of the set gives R, G, B (each component oriented so that its largest loading is positive);
   background patches are black. With ``remove_background=False`` one PCA's 3 components are shown for every patch.
3. Maps are upsampled bilinearly to the image size.

Pictures are PNG grids, rows = images, columns = image, full features, each slice; every panel is enlarged by
nearest neighbour to at least 128 pixels a side (:func:`franca.eval.pictures.picture_grid`), with the column titles
above and the share of foreground patches in each title.

``python -m franca.eval.pca --weights W [--rasa-weights R] (--images P [P ...] | --dataset STR --max-images N)
--output-dir D [--image-size 448] [--slices 384 192 96 48]``; the image size defaults to the size the checkpoint was
trained at (``--protocol franca``: 448, the paper's pictures).
"""

import argparse
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from franca.data.augmentations import IMAGENET_MEAN, IMAGENET_STD
from franca.eval.common import (
    EvalSettings,
    add_eval_arguments,
    eval_settings,
    load_backbone_for_eval,
    parse_eval_args,
    run_metadata,
    write_results,
)
from franca.eval.pictures import picture_grid, upscale_factor
from franca.eval.segmentation import check_input_size, dense_features
from franca.utils.atomic import atomic_write
from franca.utils.features import default_device
from franca.utils.logging import Progress

DEFAULT_THRESHOLD = 0.35
FOREGROUND_METHODS = ("border", "pc1")
PROTOCOLS = {"franca": (448, 448)}


@dataclass(frozen=True)
class PCASettings:
    """What the pictures show: ``slices`` None = D/2 … D/16 (:func:`default_slices`)."""

    slices: list[int] | None = None
    threshold: float = DEFAULT_THRESHOLD
    remove_background: bool = True
    rows_per_grid: int = 8
    foreground: str = "border"


def principal_components(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and the top ``n`` principal directions [n, D] of rows ``x`` [M, D] (float64, exact SVD), each
    oriented so that its largest-magnitude loading is positive; fewer when rank(x) < n."""
    x = x.double()
    mean = x.mean(dim=0)
    _, singular_values, vh = torch.linalg.svd(x - mean, full_matrices=False)
    rank = int((singular_values > singular_values.max().clamp_min(1e-30) * 1e-10).sum()) if len(x) > 1 else 0
    components = vh[: min(n, rank)]
    largest = components.gather(1, components.abs().argmax(dim=1, keepdim=True))
    return mean, components * torch.where(largest < 0, -1.0, 1.0)


def minmax_scale(values: torch.Tensor) -> torch.Tensor:
    """Columns of ``values`` [M, K] scaled to [0, 1] over the rows (a constant column becomes 0)."""
    low, high = values.min(dim=0).values, values.max(dim=0).values
    return (values - low) / (high - low).clamp_min(1e-12)


def border_mask(n: int, h: int, w: int) -> torch.Tensor:
    """[n, h, w] True on the outermost patch rows and columns of every image."""
    mask = torch.zeros(n, h, w, dtype=torch.bool)
    mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1] = True, True, True, True
    return mask


def otsu_threshold(values: torch.Tensor) -> float:
    """The threshold t (midway between two sorted values) whose split {≤ t} / {> t} maximises the between-class
    variance w₀·w₁·(μ₀ − μ₁)² (Otsu 1979, on the values themselves rather than a histogram)."""
    ordered = values.reshape(-1).double().sort().values
    n = len(ordered)
    if n < 2 or ordered[-1] - ordered[0] <= 1e-12:
        return float(ordered[-1]) if n else 0.0
    below = torch.arange(1, n, dtype=torch.float64)
    sums = ordered.cumsum(0)[:-1]
    mean_low, mean_high = sums / below, (ordered.sum() - sums) / (n - below)
    between = below * (n - below) * (mean_low - mean_high) ** 2
    between[ordered[1:] == ordered[:-1]] = -1.0  # a split must fall between two different values
    k = int(between.argmax())
    return float((ordered[k] + ordered[k + 1]) / 2)


def border_distance(patch_features: torch.Tensor) -> torch.Tensor:
    """[N, h, w, D] → [N, h, w]: each patch's cosine distance to the median of its image's border patches."""
    n, h, w, d = patch_features.shape
    unit = F.normalize(patch_features.double(), dim=-1)
    border = border_mask(1, h, w)[0]
    background = F.normalize(unit[:, border].median(dim=1).values, dim=-1)
    return 1.0 - torch.einsum("nhwd,nd->nhw", unit, background)


def foreground_mask(
    patch_features: torch.Tensor, method: str = "border", threshold: float = DEFAULT_THRESHOLD
) -> torch.Tensor:
    """[N, h, w] bool: the foreground patches of an image set by ``method`` (module docstring, step 1)."""
    if method == "border":
        scores = border_distance(patch_features)
        return torch.stack([image > otsu_threshold(image) for image in scores])
    if method != "pc1":
        raise ValueError(f"foreground method {method!r} is unknown; choose one of {', '.join(FOREGROUND_METHODS)}")
    n, h, w, d = patch_features.shape
    x = patch_features.reshape(-1, d).double()
    mean, components = principal_components(x, 1)
    if not len(components):
        return torch.ones(n, h, w, dtype=torch.bool)
    first = (x - mean) @ components[0]
    if first[border_mask(n, h, w).reshape(-1)].mean() < first.mean():
        first = -first
    return (minmax_scale(first[:, None])[:, 0] <= threshold).reshape(n, h, w)


def pca_rgb(
    patch_features: torch.Tensor,
    threshold: float = DEFAULT_THRESHOLD,
    remove_background: bool = True,
    foreground: str = "border",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch features [N, h, w, D] of an image set → (RGB [N, h, w, 3] in [0, 1], foreground [N, h, w] bool).

    See the module docstring; ``threshold`` applies to the ``pc1`` foreground; without ``remove_background`` every
    patch is foreground.
    """
    n, h, w, d = patch_features.shape
    x = patch_features.reshape(-1, d).double()
    if remove_background:
        mask = foreground_mask(patch_features, foreground, threshold).reshape(-1)
    else:
        mask = torch.ones(len(x), dtype=torch.bool)
    rgb = torch.zeros(len(x), 3, dtype=torch.float64)
    if mask.sum() > 1:
        mean, components = principal_components(x[mask], 3)
        rgb[mask, : components.shape[0]] = minmax_scale((x[mask] - mean) @ components.T)
    return rgb.float().reshape(n, h, w, 3), mask.reshape(n, h, w)


def upsample_rgb(rgb: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """[N, h, w, 3] in [0, 1] → uint8 [N, H, W, 3] by bilinear upsampling."""
    up = F.interpolate(rgb.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
    return (up.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def save_png_atomic(image: Image.Image, path: Path) -> Path:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write(path, buffer.getvalue())
    return path


def default_slices(dim: int) -> list[int]:
    """D/2, D/4, D/8, D/16: the Matryoshka nesting levels below the full dimension."""
    return [dim // divisor for divisor in (2, 4, 8, 16) if dim // divisor > 0]


def make_pca_transform(size: tuple[int, int]) -> v2.Compose:
    return v2.Compose([v2.ToImage(), v2.Resize(size, antialias=True), v2.ToDtype(torch.float32, scale=True)])


@torch.no_grad()
def pca_pictures(
    backbone: nn.Module,
    images: list[Image.Image],
    output_dir: str | os.PathLike,
    settings: EvalSettings,
    pictures: PCASettings = PCASettings(),
    device: torch.device | None = None,
) -> dict:
    """Writes ``pca_grid_<k>.png`` files (rows = images) to ``output_dir``; returns what was written."""
    device = device or default_device()
    input_size, slices, threshold = settings.image_size, pictures.slices, pictures.threshold
    remove_background, rows_per_grid = pictures.remove_background, pictures.rows_per_grid
    check_input_size(input_size, backbone.patch_size)
    backbone = backbone.to(device).eval()
    pixels = torch.stack([make_pca_transform(input_size)(image) for image in images])
    normalize = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    progress, chunks = Progress("pca features", len(images)), []
    for batch in pixels.split(settings.batch_size):
        chunks.append(dense_features(backbone, normalize(batch).to(device), settings.use_rasa_head).cpu())
        progress.print(sum(len(chunk) for chunk in chunks))
    features = torch.cat(chunks)
    dim = features.shape[-1]
    slices = default_slices(dim) if slices is None else slices
    bad = [d for d in slices if not 0 < d <= dim]
    if bad:
        raise ValueError(f"slices {bad} are not feature counts in (0, {dim}]; pass --slices between 1 and {dim}")
    columns = [(pixels.permute(0, 2, 3, 1) * 255).round().byte().numpy()]
    titles, foreground_shares = ["image", f"full ({dim})", *(f"first {d}" for d in slices)], {}
    for d in [dim, *slices]:
        rgb, foreground = pca_rgb(features[..., :d], threshold, remove_background, pictures.foreground)
        columns.append(upsample_rgb(rgb, input_size))
        foreground_shares[str(d)] = foreground.float().mean().item()
    shown = titles[:1] + [
        f"{title}, fg {100 * share:.0f}%" if remove_background else title
        for title, share in zip(titles[1:], foreground_shares.values())
    ]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    grids = []
    for k, start in enumerate(range(0, len(images), rows_per_grid)):
        rows = [[column[r] for column in columns] for r in range(start, min(start + rows_per_grid, len(images)))]
        grids.append(save_png_atomic(picture_grid(rows, shown), output_dir / f"pca_grid_{k:03d}.png").name)
    return {
        "grids": grids,
        "columns": titles,
        "feature_dims": [dim, *slices],
        "foreground_share": foreground_shares,
        "input_size": list(input_size),
        "panel_scale": upscale_factor(*input_size),
        "foreground": pictures.foreground if remove_background else None,
        "threshold": threshold,
        "remove_background": remove_background,
    }


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("franca.eval.pca", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_eval_arguments(p, batch_size=16, old_size_names=("--input-size",), protocols=PROTOCOLS)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", help="image files")
    source.add_argument("--dataset", help="dataset string, e.g. ImageFolder:root=R")
    p.add_argument("--max-images", type=int, default=8, help="images taken from --dataset")
    p.add_argument("--slices", type=int, nargs="*", default=None, help="feature counts (default D/2 D/4 D/8 D/16)")
    p.add_argument(
        "--foreground",
        choices=FOREGROUND_METHODS,
        default="border",
        help="border: far from the median border patch (Otsu split; default); pc1: the original's first component",
    )
    p.add_argument(
        "--threshold", type=float, default=DEFAULT_THRESHOLD, help="--foreground pc1: background where scaled PC1 > it"
    )
    p.add_argument("--keep-background", action="store_true", help="one PCA of all patches, no foreground step")
    p.add_argument("--rows-per-grid", type=int, default=8)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parse_eval_args(get_args_parser(), argv)
    from franca.data.datasets import decode_image
    from franca.data.loaders import make_dataset

    backbone = load_backbone_for_eval(args.weights, args.rasa_weights)
    settings = eval_settings(args, backbone, PROTOCOLS)
    if args.images:
        names, images = list(args.images), [decode_image(path, settings.decoding) for path in args.images]
    else:
        dataset = make_dataset(args.dataset, decoding=settings.decoding)
        count = min(args.max_images, len(dataset))
        names, images = [f"{args.dataset}[{i}]" for i in range(count)], [dataset[i][0] for i in range(count)]
    pictures = PCASettings(args.slices, args.threshold, not args.keep_background, args.rows_per_grid, args.foreground)
    results = pca_pictures(backbone, images, args.output_dir, settings, pictures, default_device())
    record = {"weights": args.weights, "rasa_weights": args.rasa_weights, "images": names, **results}
    datasets = {"images": names} if args.images else {"dataset": args.dataset, "images": names}
    write_results(args.output_dir, "pca", record, run_metadata(args, settings, datasets))
    print(f"pca: wrote {', '.join(results['grids'])} to {args.output_dir}")
    return record


if __name__ == "__main__":
    main()
