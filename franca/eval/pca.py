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
nearest neighbour to at least 128 pixels a side (:func:`franca.eval.lib.pictures.picture_grid`), with the column titles
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

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from franca.data.augmentations import IMAGENET_MEAN, IMAGENET_STD
from franca.eval.lib import common
from franca.eval.lib.feature_pca import DEFAULT_THRESHOLD, FOREGROUND_METHODS, pca_rgb, upsample_rgb
from franca.eval.lib.pictures import picture_grid, upscale_factor
from franca.eval.lib.segmentation import check_input_size, dense_features
from franca.utils.atomic import atomic_write
from franca.utils.features import default_device
from franca.utils.logging import Progress

PROTOCOLS = {"franca": (448, 448)}


@dataclass(frozen=True)
class PCASettings:
    """What the pictures show: ``slices`` None = D/2 … D/16 (:func:`default_slices`)."""

    slices: list[int] | None = None
    threshold: float = DEFAULT_THRESHOLD
    remove_background: bool = True
    rows_per_grid: int = 8
    foreground: str = "border"


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
    settings: common.EvalSettings,
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
    common.add_eval_arguments(p, batch_size=16, old_size_names=("--input-size",), protocols=PROTOCOLS)
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
    args = common.parse_eval_args(get_args_parser(), argv)
    from franca.data.datasets import decode_image
    from franca.data.loaders import make_dataset

    backbone = common.load_backbone_for_eval(args.weights, args.rasa_weights)
    settings = common.eval_settings(args, backbone, PROTOCOLS)
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
    common.write_results(args.output_dir, "pca", record, common.run_metadata(args, settings, datasets))
    print(f"pca: wrote {', '.join(results['grids'])} to {args.output_dir}")
    return record


if __name__ == "__main__":
    main()
