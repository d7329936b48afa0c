"""How much absolute position a backbone's patch features encode, before and after each RASA removal (docs/rasa.md).

For every prefix of the head (0, 1, …, n+1 removed planes: the pre-layers in order, then ``pos_pred``) it reports:
the MSE and R² of a fresh ridge read-out of the (row, col) position, fit on one part of the images (strength chosen
by leave-images-out validation within it) and scored on the held-out rest, or why there are too few images for it;
the share of that R² the removal took away (``positional_variance_removed``); the share of feature variance removed;
and, when the dataset has class masks (VOC), the unsupervised-segmentation mIoU of the original's validation
(valeoai/Franca rasa/src/rasa.py, ``validation_step``: standardise, PCA→50, upsample bilinearly to S×S masks, k-means
with K=21, Hungarian matching). It also reports the MSE of the head's own ``pos_pred`` prediction, and draws the
predicted position maps of a few held-out images before and after debiasing.

``python -m rasa.eval --weights W --rasa-weights R --dataset STR --output-dir D``
→ ``D/results_rasa_eval.json`` (with the ``metadata`` block of the evaluation commands) and
``D/rasa_position_maps.png``. It takes the evaluation commands' shared options (docs/evaluation.md, "Shared
options"): the image size defaults to the checkpoint's, the decoding to the one it records, the workers to the
machine's CPUs, and it prints the ``sizes:`` line. Masks of any segmentation dataset (VOC, ADE20K, ``SegFolder``)
give the mIoU.
"""

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from franca.data.augmentations import IMAGENET_MEAN, IMAGENET_STD
from franca.data.datasets.base import IGNORE_INDEX
from franca.eval.lib.common import EvalSettings, add_eval_arguments, eval_settings, parse_eval_args, run_metadata
from franca.models.rasa_head import RASAHead, remove_plane
from franca.utils.atomic import atomic_write
from franca.utils.features import default_device
from franca.utils.logging import Progress
from rasa.data import collate_images_and_masks, grid_positions, square_grid_side
from rasa.kmeans import (
    assign_clusters,
    confusion_matrix,
    hungarian_match,
    kmeans,
    kmeans_backend,
    matched_miou,
    pca_projection,
)
from rasa.regression import cross_validated_ridge, mean_squared_error, predict, r2_scores, total_variance

RESULTS_FILE = "results_rasa_eval.json"
PLOT_FILE = "rasa_position_maps.png"
# Fewer fit or held-out images than this give no R²: a held-out R² over a handful of images says more about those
# images than about the features, and the ridge validation needs whole images in each of its folds.
MIN_READOUT_IMAGES = 8
READOUT_FOLDS = 4
# Candidate ridge strengths α, relative to the mean eigenvalue of the centred Gram matrix (rasa.regression).
RELATIVE_RIDGES = tuple(10.0**k for k in range(-6, 4))
# Below this R² before removal there is no linear position signal to speak of: no removed share is reported.
MIN_POSITION_R2 = 0.05


@torch.no_grad()
def device_patch_tokens(backbone: torch.nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x_norm_patchtokens`` [B, N, D] in fp32 on ``device`` (bf16 autocast on CUDA)."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = backbone.forward_features(images.to(device, non_blocking=True))["x_norm_patchtokens"]
    return out.float()


def patch_tokens(backbone: torch.nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x_norm_patchtokens`` [B, N, D] in fp32 on CPU, to be gathered over a dataset."""
    return device_patch_tokens(backbone, images, device).cpu()


def extract_patch_tokens(
    backbone: torch.nn.Module,
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    keep_images: tuple[int, ...] = (),
    name: str = "patch tokens",
    log_every_s: float = 10.0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(tokens [M, N, D], masks [M, S, S] or None, the input images of the indices ``keep_images`` in ascending
    order [K, 3, H, W] (for pictures), or None when none is kept)."""
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_images_and_masks, shuffle=False
    )
    tokens, masks, kept_images = [], [], []
    progress, last, done = Progress(f"extracting {name}", len(dataset)), time.perf_counter(), 0
    for images, batch_masks in loader:
        tokens.append(patch_tokens(backbone, images, device))
        if batch_masks is not None:
            masks.append(batch_masks)
        kept_images += [images[i - done] for i in sorted(keep_images) if done <= i < done + len(images)]
        done += len(images)
        if time.perf_counter() - last > log_every_s or done == len(dataset):
            progress.print(done)
            last = time.perf_counter()
    has_masks = len(masks) == len(tokens)
    return torch.cat(tokens), torch.cat(masks) if has_masks else None, torch.stack(kept_images) if kept_images else None


def remove_first_planes(tokens: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """Tokens [..., D] with the planes of ``weights`` removed in order (a prefix of the head's removal)."""
    for weight in weights:
        _, tokens = remove_plane(tokens, weight.detach().cpu().float())
    return tokens


def too_few_images(fit_images: int, held_out_images: int) -> str | None:
    """Why a position read-out over these many images would not be meaningful, or None when it would."""
    if min(fit_images, held_out_images) >= MIN_READOUT_IMAGES:
        return None
    return (
        f"too few images for a meaningful position R²: {fit_images} to fit and {held_out_images} held out, need at "
        f"least {MIN_READOUT_IMAGES} each; evaluate on at least {2 * MIN_READOUT_IMAGES} images"
    )


def image_folds(num_images: int, tokens_per_image: int, folds: int = READOUT_FOLDS) -> torch.Tensor:
    """Fold id [num_images · tokens_per_image] of each token: image i's tokens all go to fold i mod ``folds``."""
    return (torch.arange(num_images) % folds).repeat_interleave(tokens_per_image)


def position_readout(train_tokens: torch.Tensor, test_tokens: torch.Tensor) -> dict:
    """Fresh ridge regression tokens → (row, col), fit on the images ``train_tokens`` [M, N, D] and scored on the
    other images ``test_tokens`` [K, N, D]; the ridge strength is chosen by leave-images-out validation within the
    fit images. With fewer than ``MIN_READOUT_IMAGES`` on either side the scores are None and
    ``position_readout_note`` says why."""
    empty = dict.fromkeys(("position_mse", "position_r2", "position_r2_row", "position_r2_col", "position_ridge"))
    note = too_few_images(len(train_tokens), len(test_tokens))
    if note is not None:
        return {**empty, "position_readout_note": note, "prediction": None}
    count, tokens_per_image, dim = train_tokens.shape
    side = square_grid_side(tokens_per_image)
    targets = grid_positions(side, side)
    fit = cross_validated_ridge(
        train_tokens.reshape(-1, dim),
        targets.repeat(count, 1),
        image_folds(count, tokens_per_image),
        RELATIVE_RIDGES,
    )
    prediction = predict(test_tokens.reshape(-1, dim), fit.weight, fit.bias)
    test_targets = targets.repeat(len(test_tokens), 1)
    r2 = r2_scores(prediction, test_targets)
    return {
        "position_mse": mean_squared_error(prediction, test_targets),
        "position_r2": float(r2.mean()),
        "position_r2_row": float(r2[0]),
        "position_r2_col": float(r2[1]),
        "position_ridge": fit.relative_ridge,
        "prediction": prediction.float().reshape(len(test_tokens), side, side, 2),
    }


def positional_variance_removed(r2_before: float | None, r2_after: float | None) -> float | None:
    """1 − max(R²_after, 0) / R²_before: the share of the position variance that a linear read-out explained before
    the removal and no longer explains after it (1: all of it removed). None without both R², or when R²_before is
    below ``MIN_POSITION_R2`` (no position signal to remove). A negative R² (worse than predicting the mean position)
    counts as 0."""
    if r2_before is None or r2_after is None or r2_before < MIN_POSITION_R2:
        return None
    return 1.0 - max(r2_after, 0.0) / r2_before


def head_prediction_mse(head: RASAHead, tokens: torch.Tensor) -> float:
    """MSE of the head's own ``sigmoid(pos_pred)`` on tokens with its pre-layers removed (the training objective)."""
    side = square_grid_side(tokens.shape[1])
    with torch.no_grad():
        reduced = remove_first_planes(tokens, head.weights(use_pos_pred=False))
        prediction = torch.sigmoid(reduced @ head.pos_pred.weight.detach().cpu().float().T)
    return mean_squared_error(prediction, grid_positions(side, side).expand_as(prediction))


def unsupervised_miou(
    tokens: torch.Tensor,
    masks: torch.Tensor,
    num_classes: int = 21,
    ignore_index: int = IGNORE_INDEX,
    pca_dim: int = 50,
    seed: int = 1,
    max_points_per_centroid: int = 256,
) -> float:
    """k-means (K = num_classes) segmentation mIoU with Hungarian matching (as the original's validation, docs/rasa.md).

    Tokens [M, N, D] are standardised and PCA-projected (statistics over the patch tokens), upsampled bilinearly to
    the masks' S×S, clustered (k-means fit on a random sample of pixels, as faiss does) and compared with the masks.
    """
    side, size = square_grid_side(tokens.shape[1]), masks.shape[-1]
    flat = tokens.reshape(-1, tokens.shape[-1])
    mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
    pca_mean, components = pca_projection((flat - mean) / std, pca_dim)

    def upsampled(index: int) -> torch.Tensor:
        reduced = (((tokens[index] - mean) / std) - pca_mean) @ components.T
        grid = reduced.T.reshape(1, -1, side, side)
        return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)[0].flatten(1).T

    generator = torch.Generator().manual_seed(seed)
    per_image = math.ceil(max_points_per_centroid * num_classes / len(tokens))
    sample = torch.cat(
        [upsampled(i)[torch.randperm(size * size, generator=generator)[:per_image]] for i in range(len(tokens))]
    )
    centroids = kmeans(sample, num_classes, seed=seed, max_points_per_centroid=max_points_per_centroid)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for i in range(len(tokens)):
        clusters = assign_clusters(upsampled(i), centroids)
        confusion += confusion_matrix(clusters, masks[i].reshape(-1), num_classes, num_classes, ignore_index)
    miou, _ = matched_miou(confusion, hungarian_match(confusion))
    return miou


def split_images(count: int, train_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint image indices (fit part, held-out part) from a seeded shuffle."""
    n_train = int(round(count * train_fraction))
    if not 1 <= n_train < count:
        raise ValueError(
            f"{count} images with train_fraction={train_fraction} leave no image to fit or to score the position "
            "read-out; use at least 2 images and 0 < train_fraction < 1"
        )
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[:n_train], order[n_train:]


def evaluate_removal(
    head: RASAHead,
    tokens: torch.Tensor,
    masks: torch.Tensor | None,
    fit: torch.Tensor,
    held_out: torch.Tensor,
    with_miou: bool = True,
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Per-prefix metrics (see the module docstring) with the read-out fit on images ``fit`` and scored on
    ``held_out``, and its predictions [len(held_out), h, w, 2] before and after the full removal (none when there
    are too few images for a read-out)."""
    weights = head.weights(use_pos_pred=True)
    raw_variance = total_variance(tokens.reshape(-1, tokens.shape[-1]))
    stages, predictions = [], {}
    progress = Progress("RASA removal stages", len(weights) + 1)
    for removed in range(len(weights) + 1):
        reduced = remove_first_planes(tokens, weights[:removed])
        readout = position_readout(reduced[fit], reduced[held_out])
        prediction = readout.pop("prediction")
        if removed in (0, len(weights)) and prediction is not None:
            predictions["before" if removed == 0 else "after"] = prediction
        stage = {
            "removed_planes": removed,
            "removed": "none" if removed == 0 else ("all (inference)" if removed == len(weights) else "pre-layers"),
            **readout,
            "positional_variance_removed": positional_variance_removed(
                stages[0]["position_r2"] if stages else readout["position_r2"], readout["position_r2"]
            ),
            "variance_removed": 1.0 - total_variance(reduced.reshape(-1, reduced.shape[-1])) / raw_variance,
        }
        if masks is not None and with_miou:
            stage["kmeans_miou"] = unsupervised_miou(reduced, masks, seed=1)
        stages.append(stage)
        progress.print(removed + 1, f"R² {format_r2(stage['position_r2'])}")
    return stages, predictions


def format_r2(r2: float | None) -> str:
    return "n/a (too few images)" if r2 is None else f"{r2:.3f}"


def _denormalise(image: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def plot_position_maps(images: torch.Tensor, before: torch.Tensor, after: torch.Tensor, path: Path) -> Path:
    """Rows: images; columns: image, then for row and column the true map, the read-out before and after debiasing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = before.shape[1]
    truth = grid_positions(side, side).reshape(side, side, 2)
    titles = ["image", "true row", "row: raw", "row: RASA", "true col", "col: raw", "col: RASA"]
    fig, axes = plt.subplots(len(images), len(titles), figsize=(1.6 * len(titles), 1.6 * len(images)), squeeze=False)
    for row, image in enumerate(images):
        panels = [truth[..., 0], before[row, ..., 0], after[row, ..., 0]]
        panels += [truth[..., 1], before[row, ..., 1], after[row, ..., 1]]
        axes[row, 0].imshow(_denormalise(image))
        for col, panel in enumerate(panels, start=1):
            axes[row, col].imshow(panel.numpy(), vmin=0, vmax=1, cmap="viridis")
        for col, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(titles[col], fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda stream: fig.savefig(stream, dpi=100, format="png"))
    plt.close(fig)
    return path


def write_json_atomic(record: dict, path: Path) -> None:
    atomic_write(path, json.dumps(record, indent=2))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("rasa.eval", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_eval_arguments(p, batch_size=64)
    p.add_argument("--dataset", required=True, help="dataset string, e.g. VOC:root=R:split=val (masks give mIoU)")
    p.add_argument("--mask-size", type=int, default=100, help="side of the masks the features are upsampled to")
    p.add_argument("--max-images", type=int, default=0, help="use only the first N images (0: all)")
    p.add_argument("--train-fraction", type=float, default=0.5, help="share of images fitting the read-out")
    p.add_argument("--no-miou", action="store_true", help="skip the k-means segmentation even when masks exist")
    p.add_argument("--num-plot-images", type=int, default=4)
    return p


def square_size(settings: EvalSettings) -> int:
    """The square side RASA evaluates at (its position targets assume a square patch grid)."""
    height, width = settings.image_size
    if height != width:
        raise ValueError(f"--image-size {height} {width}: RASA evaluates square images; give one size")
    return height


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = get_args_parser()
    args = parse_eval_args(parser, argv)
    if args.rasa_weights is None:
        parser.error("--rasa-weights is required: the RASA head file to evaluate (e.g. DIR/rasa_head.pth)")
    from franca.data.loaders import make_dataset
    from franca.hub import load_backbone, load_rasa_head
    from rasa.data import MaskToTensor, make_rasa_eval_transform

    device = default_device()
    backbone = load_backbone(args.weights).to(device).eval()
    head = load_rasa_head(args.rasa_weights, embed_dim=backbone.embed_dim)
    settings = eval_settings(args, backbone)
    size = square_size(settings)
    dataset = make_dataset(
        args.dataset,
        transform=make_rasa_eval_transform(size),
        target_transform=MaskToTensor(args.mask_size),
        decoding=settings.decoding,
    )
    if args.max_images:
        dataset = Subset(dataset, range(min(args.max_images, len(dataset))))
    fit, held_out = split_images(len(dataset), args.train_fraction, args.seed)
    shown = sorted(held_out[: args.num_plot_images].tolist())
    tokens, masks, images = extract_patch_tokens(
        backbone, dataset, settings.batch_size, settings.num_workers, device, keep_images=tuple(shown)
    )
    stages, maps = evaluate_removal(head, tokens, masks, fit, held_out, with_miou=not args.no_miou)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if images is not None and maps:
        rows = [held_out.tolist().index(i) for i in shown]
        plot_position_maps(images, maps["before"][rows], maps["after"][rows], out / PLOT_FILE)
    record = {
        "weights": args.weights,
        "rasa_weights": args.rasa_weights,
        "dataset": args.dataset,
        "image_size": size,
        "num_images": len(tokens),
        "train_fraction": args.train_fraction,
        "rasa_pre_layers": head.n_pos_layers,
        "rasa_pos_pred_mse": head_prediction_mse(head, tokens),
        "kmeans_backend": kmeans_backend() if masks is not None and not args.no_miou else None,
        "stages": stages,
    }
    metadata = run_metadata(args, settings, {"dataset": args.dataset}, {"mask_size": args.mask_size})
    write_json_atomic({**record, "metadata": metadata}, out / RESULTS_FILE)
    if "position_readout_note" in stages[0]:
        print(f"position read-out skipped: {stages[0]['position_readout_note']}")
    for stage in stages:
        miou = f"  mIoU {stage['kmeans_miou']:.1f}" if "kmeans_miou" in stage else ""
        share = stage["positional_variance_removed"]
        removed = "" if share is None else f" ({100 * share:.1f}% of it removed)"
        print(
            f"removed {stage['removed_planes']:>2} planes: held-out position R² {format_r2(stage['position_r2'])}"
            f"{removed}  feature variance removed {100 * stage['variance_removed']:.2f}%{miou}"
        )
    return record


if __name__ == "__main__":
    main()
