"""The C search and fit of the logistic-regression evaluation (:mod:`franca.eval.log_regression`, whose docstring
gives the protocol; docs/evaluation.md, "Logistic regression"), shared with the Matryoshka and OOD commands: the C grid,
the held-out split, the warm-started search with early exit, and the refit on the whole training set."""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from franca.eval.lib.logreg_backends import LinearModel
from franca.utils.accuracy import topk_accuracy
from franca.utils.logging import Progress, format_duration

ORIGINAL_GRID_SIZE = 45
C_LOG10_RANGE = (-6.0, 5.0)
RELATIVE_TOLERANCE = 1e-5
DEFAULT_PATIENCE = 3


def c_grid(size: int = ORIGINAL_GRID_SIZE, log10_min: float = -6.0, log10_max: float = 5.0) -> list[float]:
    """The inverse regularisation strengths C = 10^linspace(log10_min, log10_max, size)."""
    if size < 1:
        raise ValueError(f"the C grid needs at least one value, got size={size}")
    return [float(c) for c in np.logspace(log10_min, log10_max, size)]


def scaled_grid_size(n_holdout: int, log10_min: float = -6.0, log10_max: float = 5.0) -> int:
    """Number of C values for a holdout of ``n_holdout`` samples: clamp(log10(n_holdout) - 1, 1, 4) per decade.

    A holdout of n samples measures accuracy in steps of 1/n, so a small one cannot tell close C values apart and a
    fine grid only adds fits; from 100,000 holdout samples (ImageNet-1k's 128k) the grid is the original 45 values.
    """
    per_decade = min(4.0, max(1.0, math.log10(max(n_holdout, 1)) - 1.0))
    return round(per_decade * (log10_max - log10_min)) + 1


def scaled_tolerance(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, relative: float = RELATIVE_TOLERANCE
) -> float:
    """Solver gradient tolerance relative to the problem: ``relative`` × the sup norm of the gradient at W = 0, b = 0.

    The solvers minimise the per-sample mean objective and stop when every gradient component is below the
    tolerance; at zero that gradient is (1/K − onehot(y))ᵀ[x, 1] / n (the penalty adds nothing there), so the
    tolerance follows the scale of the features and of the class imbalance instead of being a fixed 1e-7.
    """
    x = features.double()
    n = len(labels)
    class_sums = torch.zeros(num_classes, x.shape[1], dtype=torch.float64).index_add_(0, labels, x)
    grad_weight = x.mean(0) / num_classes - class_sums / n
    grad_bias = 1.0 / num_classes - torch.bincount(labels, minlength=num_classes).double() / n
    return relative * max(grad_weight.abs().max().item(), grad_bias.abs().max().item())


def holdout_split(n: int, fraction: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (fit, holdout) of a seeded random split; the holdout has round(fraction·n) ≥ 1 samples."""
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction {fraction} must be in (0, 1)")
    n_holdout = max(1, round(fraction * n))
    if n_holdout >= n:
        raise ValueError(f"{n} training samples are too few to hold out {fraction:.0%} for choosing C")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_holdout:], order[:n_holdout]


def best_c_of(holdout_top1: dict[str, float]) -> float:
    """The C with the best holdout top-1; ties go to the smaller C (the stronger regularisation)."""
    return float(max(holdout_top1, key=lambda c: (holdout_top1[c], -float(c))))


def search_should_stop(accuracies: list[float], patience: int | None) -> bool:
    """Whether the ascending C search can stop, given the holdout accuracies so far (in C order).

    With ``patience`` None it never stops. Otherwise it stops at 100% (a larger C can at best tie, and ties go to the
    smaller C), and once the accuracy has risen above its first value (strong regularisation often starts on a
    plateau of constant predictions) without beating its best for ``patience`` C values.
    """
    if patience is None:
        return False
    best = max(accuracies)
    if best >= 100.0:
        return True
    since_best = len(accuracies) - 1 - accuracies.index(best)
    return best > accuracies[0] and since_best >= patience


@dataclass
class SearchStep:
    """The C search after one more fit: what the progress line shows and what partial results are made of."""

    done: int
    c: float
    holdout_top1: dict[str, float]
    best_c: float
    best_model: LinearModel
    elapsed_s: float


def select_c_and_fit(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    c_values: list[float],
    backend,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    num_classes: int | None = None,
    name: str = "logistic regression",
    tol: float | None = None,
    patience: int | None = None,
    warm_start: bool = True,
    on_step: Callable[[SearchStep], None] | None = None,
) -> tuple[LinearModel, float, dict[str, float]]:
    """Choose C by holdout top-1 accuracy (ties: the smaller C), then refit on all of train at that C.

    C values are fitted in ascending order; with ``warm_start`` (and a backend that can) each fit starts from the
    previous solution and the refit from the chosen one. ``tol`` overrides the backend's gradient tolerance,
    ``patience`` enables the early exit of :func:`search_should_stop`, ``on_step`` is called after every C.
    Returns the final model, the chosen C and the holdout accuracy of every C fitted.
    """
    if not c_values:
        raise ValueError("no C values to choose from: c_values is empty; pass at least one, e.g. c_grid()")
    num_classes = num_classes or int(train_labels.max()) + 1
    warm_start = warm_start and backend.warm_start
    fit_idx, holdout_idx = holdout_split(len(train_features), holdout_fraction, seed)
    x_fit, y_fit = train_features[fit_idx], train_labels[fit_idx]
    x_hold, y_hold = train_features[holdout_idx], train_labels[holdout_idx]
    c_sorted = sorted(c_values)
    holdout_top1: dict[str, float] = {}
    progress = Progress(f"{name}: choosing C", len(c_sorted))
    start = time.perf_counter()
    model = best_model = None
    stopped: list[str] = []
    for done, c in enumerate(c_sorted, start=1):
        model = backend.fit(x_fit, y_fit, c, num_classes, init=model if warm_start else None, tol=tol)
        stopped += [] if model.converged else [f"{c:.3g}"]
        holdout_top1[repr(c)] = topk_accuracy(model.logits(x_hold), y_hold, 1)
        best_c = best_c_of(holdout_top1)
        best_model = model if best_c == c else best_model
        elapsed = time.perf_counter() - start
        progress.print(
            done,
            f"C={c:.3g} holdout top-1 {holdout_top1[repr(c)]:.2f}% (best {holdout_top1[repr(best_c)]:.2f}% at "
            f"C={best_c:.3g}) elapsed {format_duration(elapsed)}",
        )
        if on_step is not None:
            on_step(SearchStep(done, c, dict(holdout_top1), best_c, best_model, elapsed))
        if search_should_stop(list(holdout_top1.values()), patience):
            if done < len(c_sorted):
                print(f"{name}: stopping after {done}/{len(c_sorted)} C values (patience {patience})", flush=True)
            break
    print(f"{name}: best C={best_c:.4g}, refitting on all {len(train_features)} training samples", flush=True)
    final = backend.fit(
        train_features, train_labels, best_c, num_classes, init=best_model if warm_start else None, tol=tol
    )
    stopped += [] if final.converged else [f"{best_c:.3g} (refit)"]
    note = convergence_note(name, stopped, done + 1, backend.max_iter)
    if note:
        print(note, flush=True)
    return final, best_c, holdout_top1


def convergence_note(name: str, stopped: list[str], fits: int, max_iter: int) -> str | None:
    """One line for all the fits that stopped at the iteration limit (``stopped``: their C values), instead of a
    warning block per fit."""
    if not stopped:
        return None
    return (
        f"{name}: {len(stopped)} of {fits} fits stopped at --max-iter {max_iter} before the tolerance "
        f"(C = {', '.join(stopped)}); "
        "their accuracies are those of the last iterate: raise --max-iter, or --tol, to let them finish"
    )


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
    tol: float | None = None,
    patience: int | None = None,
    warm_start: bool = True,
    on_step: Callable[[SearchStep], None] | None = None,
) -> dict:
    """The whole protocol on features already extracted: {best_c, top1, top5, holdout_top1 per C fitted}.

    ``tol``, ``patience``, ``warm_start`` and ``on_step`` as in :func:`select_c_and_fit`.
    """
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    model, best_c, holdout = select_c_and_fit(
        train_features,
        train_labels,
        c_values,
        backend,
        holdout_fraction,
        seed,
        num_classes,
        name,
        tol=tol,
        patience=patience,
        warm_start=warm_start,
        on_step=on_step,
    )
    logits = model.logits(val_features)
    return {
        "best_c": best_c,
        "top1": topk_accuracy(logits, val_labels, 1),
        "top5": topk_accuracy(logits, val_labels, 5),
        "holdout_top1": holdout,
    }


@dataclass
class SearchSettings:
    """The C search a command line asks for: ``original`` or ``scaled`` (see the module docstring)."""

    protocol: str
    c_values: list[float]
    tol: float | None
    patience: int | None
    warm_start: bool


def original_search() -> SearchSettings:
    """valeoai/Franca ``sweep_C_values``: all 45 C values, the backend's own tolerance, every fit from zero."""
    return SearchSettings("original", c_grid(ORIGINAL_GRID_SIZE, *C_LOG10_RANGE), None, None, False)


def scaled_search(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    holdout_fraction: float = 0.1,
    grid_size: int | None = None,
    c_log10_range: tuple[float, float] = C_LOG10_RANGE,
    tol: float | None = None,
    patience: int = DEFAULT_PATIENCE,
) -> SearchSettings:
    """The default search: grid of :func:`scaled_grid_size` values and tolerance of :func:`scaled_tolerance` unless
    given, warm starts, early exit after ``patience`` C values without improvement (0: none)."""
    n_holdout = max(1, round(holdout_fraction * len(train_labels)))
    size = grid_size or scaled_grid_size(n_holdout, *c_log10_range)
    tol = scaled_tolerance(train_features, train_labels, num_classes) if tol is None else tol
    return SearchSettings("scaled", c_grid(size, *c_log10_range), tol, patience or None, True)
