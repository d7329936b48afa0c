"""L2 logistic regression on frozen CLS features (reference §7, the DINOv2 ``log_regression`` protocol).

C is chosen over 10^linspace(−6, 5, 45) by top-1 accuracy on a held-out 10% of the training set (a seeded random
split); the model is then refitted on the whole training set at the best C and scored on the validation set.
Features are used as extracted (no normalisation), in float64. With ``--rasa-weights`` the feature is the mean
RASA-debiased patch token instead of the CLS token (RASA does not touch the CLS token).

``python -m franca.eval.log_regression --weights W --train-dataset STR --val-dataset STR --output-dir D``
"""

import argparse

import numpy as np
import torch

from franca.eval.common import add_backbone_arguments, extract_labelled_features, load_backbone_for_eval, write_results
from franca.eval.logreg_backends import BACKENDS, LinearModel, make_backend
from franca.eval.metrics import topk_accuracy
from franca.eval.models import FeatureModel
from franca.utils.logging import Progress


def c_grid(size: int = 45, log10_min: float = -6.0, log10_max: float = 5.0) -> list[float]:
    """The inverse regularisation strengths C = 10^linspace(log10_min, log10_max, size)."""
    if size < 1:
        raise ValueError(f"the C grid needs at least one value, got size={size}")
    return [float(c) for c in np.logspace(log10_min, log10_max, size)]


def holdout_split(n: int, fraction: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (fit, holdout) of a seeded random split; the holdout has round(fraction·n) ≥ 1 samples."""
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction {fraction} must be in (0, 1)")
    n_holdout = max(1, round(fraction * n))
    if n_holdout >= n:
        raise ValueError(f"{n} training samples are too few to hold out {fraction:.0%} for choosing C")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_holdout:], order[:n_holdout]


def select_c_and_fit(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    c_values: list[float],
    backend,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    num_classes: int | None = None,
    name: str = "logistic regression",
) -> tuple[LinearModel, float, dict[str, float]]:
    """Choose C by holdout top-1 accuracy (ties: the smaller C), then refit on all of train at that C.

    Returns the final model, the chosen C and the holdout accuracy of every C.
    """
    num_classes = num_classes or int(train_labels.max()) + 1
    fit_idx, holdout_idx = holdout_split(len(train_features), holdout_fraction, seed)
    x_fit, y_fit = train_features[fit_idx], train_labels[fit_idx]
    x_hold, y_hold = train_features[holdout_idx], train_labels[holdout_idx]
    holdout_top1: dict[str, float] = {}
    progress = Progress(f"{name}: choosing C", len(c_values))
    model = None
    for i, c in enumerate(sorted(c_values)):
        model = backend.fit(x_fit, y_fit, c, num_classes, init=model if backend.warm_start else None)
        holdout_top1[repr(c)] = topk_accuracy(model.logits(x_hold), y_hold, 1)
        progress.print(i + 1, f"C={c:.3g} holdout top-1 {holdout_top1[repr(c)]:.2f}%")
    best_c = float(max(holdout_top1, key=lambda c: (holdout_top1[c], -float(c))))
    print(f"{name}: best C={best_c:.4g}, refitting on all {len(train_features)} training samples", flush=True)
    final = backend.fit(train_features, train_labels, best_c, num_classes)
    return final, best_c, holdout_top1


def log_regression_eval(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    c_values: list[float],
    backend,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    name: str = "logistic regression",
) -> dict:
    """The whole protocol on features already extracted: {best_c, top1, top5, holdout_top1 per C}."""
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    model, best_c, holdout = select_c_and_fit(
        train_features, train_labels, c_values, backend, holdout_fraction, seed, num_classes, name
    )
    logits = model.logits(val_features)
    return {
        "best_c": best_c,
        "top1": topk_accuracy(logits, val_labels, 1),
        "top5": topk_accuracy(logits, val_labels, 5),
        "holdout_top1": holdout,
    }


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "franca.eval.log_regression", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    add_backbone_arguments(p)
    p.add_argument("--train-dataset", required=True, help="dataset string, e.g. ImageNet:split=TRAIN:root=R")
    p.add_argument("--val-dataset", required=True, help="dataset string, e.g. ImageNet:split=VAL:root=R")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="auto: cuML, else scikit-learn, else torch")
    p.add_argument("--c-grid-size", type=int, default=45, help="number of C values in 10^linspace(min, max)")
    p.add_argument("--c-log10-range", type=float, nargs=2, default=(-6.0, 5.0), metavar=("MIN", "MAX"))
    p.add_argument("--holdout-fraction", type=float, default=0.1, help="share of train held out to choose C")
    p.add_argument("--max-iter", type=int, default=1000, help="solver iterations per fit")
    p.add_argument("--seed", type=int, default=0, help="seed of the holdout split")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    backend = make_backend(args.backend, max_iter=args.max_iter)
    model = FeatureModel(load_backbone_for_eval(args.weights, args.rasa_weights), args.rasa_weights is not None)
    train = extract_labelled_features(model, args.train_dataset, args, "train")
    val = extract_labelled_features(model, args.val_dataset, args, "val")
    c_values = c_grid(args.c_grid_size, *args.c_log10_range)
    results = log_regression_eval(*train, *val, c_values, backend, args.holdout_fraction, args.seed)
    record = {
        "weights": args.weights,
        "rasa_weights": args.rasa_weights,
        "train_dataset": args.train_dataset,
        "val_dataset": args.val_dataset,
        "backend": backend.name,
        "holdout_fraction": args.holdout_fraction,
        "c_values": c_values,
        **results,
    }
    path = write_results(args.output_dir, "log_regression", record)
    print(
        f"logistic regression ({backend.name}): C={results['best_c']:.4g} top-1 {results['top1']:.2f}% "
        f"top-5 {results['top5']:.2f}% -> {path}"
    )
    return record


if __name__ == "__main__":
    main()
