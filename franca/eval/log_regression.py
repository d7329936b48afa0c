"""L2 logistic regression on frozen CLS features: the DINOv2 protocol (valeoai/Franca ``franca/eval/log_regression.py``,
``sweep_C_values`` and ``eval_log_regression``), made to finish on a CPU and to survive being stopped.

C is chosen by top-1 accuracy on a held-out 10% of the training set (a seeded random split); the model is then
refitted on the whole training set at the best C and scored on the validation set. Features are used as extracted
(no normalisation), in float64. With ``--rasa-weights`` the feature is the mean RASA-debiased patch token instead of
the CLS token (RASA does not touch the CLS token).

The default search is scaled to the data (docs/evaluation.md, "Logistic regression"):
- grid: the original range 10^[-6, 5] with clamp(log10(holdout size) - 1, 1, 4) values per decade, so 14 values for
  a 150-sample holdout and the original 45 from 100,000 holdout samples on;
- solver tolerance: 1e-5 times the largest gradient component of the objective at W = 0;
- C ascending, each fit warm-started from the previous solution, stopping once the holdout accuracy has left its
  starting value and not improved for ``--patience`` C values (or reached 100%, which no larger C can beat);
- a progress line per C, and the results file rewritten atomically after each C with ``"complete": false``.
``--original-protocol`` runs the original search instead: all 45 C values, the backend's original tolerance, each fit
from zero.

``python -m franca.eval.log_regression --weights W --train-dataset STR --val-dataset STR --output-dir D``
"""

import argparse
from collections.abc import Callable

import torch

from franca.eval.lib import common
from franca.eval.lib.logreg_backends import BACKENDS, make_backend
from franca.eval.lib.logreg_search import (
    C_LOG10_RANGE,
    DEFAULT_PATIENCE,
    RELATIVE_TOLERANCE,
    SearchSettings,
    SearchStep,
    log_regression_eval,
    original_search,
    scaled_search,
)
from franca.eval.lib.models import FeatureModel
from franca.utils.accuracy import topk_accuracy


def search_settings(
    args: argparse.Namespace, train_features: torch.Tensor, train_labels: torch.Tensor, num_classes: int
) -> SearchSettings:
    """The :class:`SearchSettings` of the parsed flags on this training set."""
    if args.original_protocol:
        explicit = [
            flag
            for flag, value in (("--c-grid-size", args.c_grid_size), ("--tol", args.tol), ("--patience", args.patience))
            if value is not None
        ]
        explicit += ["--c-log10-range"] if tuple(args.c_log10_range) != C_LOG10_RANGE else []
        if explicit:
            raise ValueError(
                f"--original-protocol fixes the C grid, tolerance and patience, so it cannot be combined with "
                f"{', '.join(explicit)}; drop --original-protocol to set them yourself"
            )
        return original_search()
    return scaled_search(
        train_features,
        train_labels,
        num_classes,
        args.holdout_fraction,
        args.c_grid_size,
        tuple(args.c_log10_range),
        args.tol,
        DEFAULT_PATIENCE if args.patience is None else args.patience,
    )


class PartialResults:
    """Rewrites ``results_eval_log_regression.json`` after each C with ``"complete": false`` and the best C so far, so
    a run stopped by Ctrl-C, SIGTERM or a kill leaves its best result. The val accuracies in it are those of the
    model fitted on the 90% split at that C (``*_before_refit``): the refit on all of train happens at the end."""

    def __init__(
        self,
        output_dir: str,
        record: dict,
        val_features: torch.Tensor,
        val_labels: torch.Tensor,
        metadata: Callable[[], dict],
    ):
        self.output_dir, self.record, self.metadata = output_dir, record, metadata
        self.val_features, self.val_labels = val_features, val_labels
        self.path = None

    def __call__(self, step: SearchStep) -> None:
        logits = step.best_model.logits(self.val_features)
        partial = {
            **self.record,
            "complete": False,
            "c_fitted": step.done,
            "search_s": round(step.elapsed_s, 3),
            "best_c": step.best_c,
            "holdout_top1": step.holdout_top1,
            "top1_before_refit": topk_accuracy(logits, self.val_labels, 1),
            "top5_before_refit": topk_accuracy(logits, self.val_labels, 5),
        }
        self.path = common.write_results(self.output_dir, "log_regression", partial, self.metadata())


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "franca.eval.log_regression", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    common.add_backbone_arguments(p)
    p.add_argument("--train-dataset", required=True, help="dataset string, e.g. ImageNet:split=TRAIN:root=R")
    p.add_argument("--val-dataset", required=True, help="dataset string, e.g. ImageNet:split=VAL:root=R")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="auto: cuML when installed, else torch")
    p.add_argument(
        "--c-grid-size",
        type=int,
        default=None,
        help="number of C values in 10^linspace(min, max) (default: scaled to the holdout size; the original: 45)",
    )
    p.add_argument("--c-log10-range", type=float, nargs=2, default=C_LOG10_RANGE, metavar=("MIN", "MAX"))
    p.add_argument("--holdout-fraction", type=float, default=0.1, help="share of train held out to choose C")
    p.add_argument("--max-iter", type=int, default=1000, help="solver iterations per fit")
    p.add_argument(
        "--tol",
        type=float,
        default=None,
        help=f"solver gradient tolerance (default: {RELATIVE_TOLERANCE:g} x the largest gradient component at W = 0)",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=None,
        help=f"stop after this many C values without a better holdout accuracy; 0: fit every C "
        f"(default: {DEFAULT_PATIENCE})",
    )
    p.add_argument(
        "--original-protocol",
        action="store_true",
        help="the original search: all 45 C values in 10^[-6, 5], the backend's own tolerance, each fit from zero",
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_eval_args(get_args_parser(), argv)
    backend = make_backend(args.backend, max_iter=args.max_iter)
    backbone = common.load_backbone_for_eval(args.weights, args.rasa_weights)
    evaluation = common.eval_settings(args, backbone, common.CLASSIFICATION_PROTOCOLS, classification=True)
    model = FeatureModel(backbone, evaluation.use_rasa_head)
    train = common.extract_labelled_features(model, args.train_dataset, evaluation, "train")
    val = common.extract_labelled_features(model, args.val_dataset, evaluation, "val")
    num_classes = int(max(train[1].max(), val[1].max())) + 1
    settings = search_settings(args, *train, num_classes)
    record = {
        "weights": args.weights,
        "rasa_weights": args.rasa_weights,
        "train_dataset": args.train_dataset,
        "val_dataset": args.val_dataset,
        "backend": backend.name,
        "holdout_fraction": args.holdout_fraction,
        "protocol": settings.protocol,
        "tol": backend.tol if settings.tol is None else settings.tol,
        "patience": settings.patience,
        "warm_start": settings.warm_start and backend.warm_start,
        "c_values": settings.c_values,
    }
    datasets = {"train": args.train_dataset, "val": args.val_dataset}
    partial = PartialResults(args.output_dir, record, *val, lambda: common.run_metadata(args, evaluation, datasets))
    try:
        results = log_regression_eval(
            *train,
            *val,
            settings.c_values,
            backend,
            args.holdout_fraction,
            args.seed,
            tol=settings.tol,
            patience=settings.patience,
            warm_start=settings.warm_start,
            on_step=partial,
        )
    except KeyboardInterrupt:
        if partial.path is not None:
            print(f'stopped: the best result so far is in {partial.path} ("complete": false)', flush=True)
        raise
    record = {**record, "complete": True, "c_fitted": len(results["holdout_top1"]), **results}
    path = common.write_results(
        args.output_dir, "log_regression", record, common.run_metadata(args, evaluation, datasets)
    )
    print(
        f"logistic regression ({backend.name}): C={results['best_c']:.4g} top-1 {results['top1']:.2f}% "
        f"top-5 {results['top5']:.2f}% -> {path}"
    )
    return record


if __name__ == "__main__":
    main()
