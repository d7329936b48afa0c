"""PCA pictures of patch features (the paper's Figure 3; valeoai/Franca ``visualize_PCA.py``), for the full features and
for Matryoshka slices (the first d channels, d ∈ {D, D/2, …, D/16}; paper arXiv 2507.14137, Sec. 3).

For one image set and one feature slice (:func:`pca_rgb`):
1. PCA of all patch features of the set; the first component, min-max scaled over the set, marks the background
   where it exceeds ``threshold`` (0.35, the original script's value). The sign of a principal component is
   arbitrary, so it is fixed here: the first component is oriented so that the patches on the image borders score
   higher than the set's mean (background high, as in the original's pictures); the others so that their largest
   loading is positive.
2. A second PCA with 3 components on the foreground patches only; each component min-max scaled over the
   foreground of the set gives R, G, B; background patches are black. With ``remove_background=False`` the first
   PCA's 3 components are shown for every patch.
3. Maps are upsampled bilinearly to the image size.

Pictures are PNG grids, rows = images, columns = image, full features, each slice.

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
from PIL import Image, ImageDraw
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
from franca.eval.features import default_device
from franca.eval.segmentation import check_input_size, dense_features
from franca.utils.atomic import atomic_write
from franca.utils.logging import Progress

DEFAULT_THRESHOLD = 0.35
HEADER_HEIGHT = 16
GAP = 2
PROTOCOLS = {"franca": (448, 448)}


@dataclass(frozen=True)
class PCASettings:
    """What the pictures show: ``slices`` None = D/2 … D/16 (:func:`default_slices`)."""

    slices: list[int] | None = None
    threshold: float = DEFAULT_THRESHOLD
    remove_background: bool = True
    rows_per_grid: int = 8


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


def pca_rgb(
    patch_features: torch.Tensor, threshold: float = DEFAULT_THRESHOLD, remove_background: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch features [N, h, w, D] of an image set → (RGB [N, h, w, 3] in [0, 1], foreground [N, h, w] bool).

    See the module docstring; without ``remove_background`` every patch is foreground.
    """
    n, h, w, d = patch_features.shape
    x = patch_features.reshape(-1, d).double()
    mean, components = principal_components(x, 3)
    projected = (x - mean) @ components.T
    if remove_background and len(components):
        first = projected[:, 0]
        border = border_mask(n, h, w).reshape(-1)
        if first[border].mean() < first.mean():
            first = -first
        foreground = minmax_scale(first[:, None])[:, 0] <= threshold
    else:
        foreground = torch.ones(len(x), dtype=torch.bool)
    rgb = torch.zeros(len(x), 3, dtype=torch.float64)
    if remove_background and foreground.sum() > 1:
        fg_mean, fg_components = principal_components(x[foreground], 3)
        fg_projected = (x[foreground] - fg_mean) @ fg_components.T
        rgb[foreground, : fg_components.shape[0]] = minmax_scale(fg_projected)
    elif not remove_background and len(components):
        rgb[:, : components.shape[0]] = minmax_scale(projected)
    return rgb.float().reshape(n, h, w, 3), foreground.reshape(n, h, w)


def upsample_rgb(rgb: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """[N, h, w, 3] in [0, 1] → uint8 [N, H, W, 3] by bilinear upsampling."""
    up = F.interpolate(rgb.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
    return (up.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def render_grid(columns: list[np.ndarray], titles: list[str]) -> Image.Image:
    """Columns of uint8 pictures [N, H, W, 3] → one PIL image, a title row on top, ``GAP`` white pixels between."""
    n, h, w, _ = columns[0].shape
    width = len(columns) * w + (len(columns) - 1) * GAP
    height = HEADER_HEIGHT + n * h + (n - 1) * GAP
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for c, column in enumerate(columns):
        for r in range(n):
            top, left = HEADER_HEIGHT + r * (h + GAP), c * (w + GAP)
            canvas[top : top + h, left : left + w] = column[r]
    grid = Image.fromarray(canvas)
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(titles):
        draw.text((c * (w + GAP) + 2, 2), title, fill=(0, 0, 0))
    return grid


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
    titles, foreground_shares = ["image", f"full ({dim})"], {}
    for d in [dim, *slices]:
        rgb, foreground = pca_rgb(features[..., :d], threshold, remove_background)
        columns.append(upsample_rgb(rgb, input_size))
        foreground_shares[str(d)] = foreground.float().mean().item()
    titles += [f"first {d}" for d in slices]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    grids = []
    for k, start in enumerate(range(0, len(images), rows_per_grid)):
        grid = render_grid([column[start : start + rows_per_grid] for column in columns], titles)
        grids.append(save_png_atomic(grid, output_dir / f"pca_grid_{k:03d}.png").name)
    return {
        "grids": grids,
        "columns": titles,
        "feature_dims": [dim, *slices],
        "foreground_share": foreground_shares,
        "input_size": list(input_size),
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
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="background: scaled PC1 > threshold")
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
    pictures = PCASettings(args.slices, args.threshold, not args.keep_background, args.rows_per_grid)
    results = pca_pictures(backbone, images, args.output_dir, settings, pictures, default_device())
    record = {"weights": args.weights, "rasa_weights": args.rasa_weights, "images": names, **results}
    datasets = {"images": names} if args.images else {"dataset": args.dataset, "images": names}
    write_results(args.output_dir, "pca", record, run_metadata(args, settings, datasets))
    print(f"pca: wrote {', '.join(results['grids'])} to {args.output_dir}")
    return record


if __name__ == "__main__":
    main()
