"""k-NN (and optionally logistic-regression) accuracy on the first d features of the CLS token (paper Figure 4).

Franca's Matryoshka heads (paper arXiv 2507.14137, Sec. 3) train the nested prefixes x[:d] of the backbone feature, so a
prefix should classify nearly as well as the whole feature. Features are extracted once; for each d in {D, D/2, …, D/64}
(halving while d ≥ 1, or a given list) the prefix is L2-normalised again and classified with the weighted k-NN of
:mod:`franca.eval.knn` (``--linear`` adds the logistic-regression protocol of :mod:`franca.eval.log_regression`).
Writes ``results_eval_matryoshka.json`` and ``matryoshka.png`` (accuracy against d, log2 axis).

``python -m franca.eval.matryoshka --weights W --train-dataset STR --val-dataset STR --output-dir D``
"""

import argparse
import importlib.util
import io
import textwrap
from pathlib import Path

import torch
import torch.nn.functional as F

from franca.eval.lib import common
from franca.eval.lib.logreg_backends import BACKENDS, make_backend
from franca.eval.lib.logreg_search import c_grid, log_regression_eval
from franca.eval.lib.models import FeatureModel
from franca.utils.atomic import atomic_write
from franca.utils.knn import DEFAULT_KS, knn_accuracies

TITLE_WRAP_CHARACTERS = 70


def matryoshka_dims(embed_dim: int, max_halvings: int = 6) -> list[int]:
    """[D, D/2, …, D/2^max_halvings] (integer halving), stopping before d < 1."""
    return [embed_dim >> k for k in range(max_halvings + 1) if embed_dim >> k >= 1]


def _check_dims(dims: list[int], embed_dim: int) -> list[int]:
    bad = [d for d in dims if not 1 <= d <= embed_dim]
    if bad:
        raise ValueError(f"Matryoshka dims {bad} must lie in [1, {embed_dim}] (the feature dimension)")
    return sorted(set(dims), reverse=True)


def matryoshka_knn(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    dims: list[int] | None = None,
    ks: tuple[int, ...] = DEFAULT_KS,
    temperature: float = 0.07,
) -> dict[int, dict[str, dict[str, float]]]:
    """{d: {k: {top1, top5}}} of weighted k-NN on the re-normalised prefixes x[:, :d] (default dims: D … D/64)."""
    dims = _check_dims(dims or matryoshka_dims(train_feats.shape[1]), train_feats.shape[1])
    return {
        d: knn_accuracies(
            F.normalize(train_feats[:, :d].float(), dim=1),
            train_labels,
            F.normalize(test_feats[:, :d].float(), dim=1),
            test_labels,
            ks=ks,
            temperature=temperature,
        )
        for d in dims
    }


def matryoshka_linear(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    dims: list[int],
    c_values: list[float],
    backend,
    seed: int = 0,
) -> dict[int, dict]:
    """{d: logistic-regression results} on the re-normalised prefixes (C chosen per d on a 10% holdout)."""
    return {
        d: log_regression_eval(
            F.normalize(train_feats[:, :d].double(), dim=1),
            train_labels,
            F.normalize(test_feats[:, :d].double(), dim=1),
            test_labels,
            c_values,
            backend,
            seed=seed,
            name=f"logistic regression d={d}",
        )
        for d in _check_dims(dims, train_feats.shape[1])
    }


def format_table(knn: dict, linear: dict | None = None) -> str:
    """A plain-text table: one row per d, top-1 per k (and of the logistic regression)."""
    ks = list(next(iter(knn.values())))
    header = ["d"] + [f"k={k}" for k in ks] + (["logreg"] if linear else [])
    rows = [
        [str(d)] + [f"{knn[d][k]['top1']:.2f}" for k in ks] + ([f"{linear[d]['top1']:.2f}"] if linear else [])
        for d in knn
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows])


def plot_matryoshka(path: str | Path, knn: dict, linear: dict | None = None, title: str = "") -> None:
    """Top-1 accuracy against the prefix size d (log2 axis), one line per k (and logistic regression); PNG.

    A long title (a checkpoint path) is wrapped to the figure's width so that none of it is cut off."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    dims = sorted(knn)
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in next(iter(knn.values())):
        ax.plot(dims, [knn[d][k]["top1"] for d in dims], marker="o", label=f"k-NN, k={k}")
    if linear:
        ax.plot(dims, [linear[d]["top1"] for d in dims], marker="s", label="logistic regression")
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims, [str(d) for d in dims])
    ax.set_xlabel("feature dimensions used (first d)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(textwrap.fill(title or "Matryoshka slices", TITLE_WRAP_CHARACTERS), fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, buffer.getvalue())


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "franca.eval.matryoshka", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    common.add_backbone_arguments(p)
    p.add_argument("--train-dataset", required=True, help="dataset string, e.g. ImageNet:split=TRAIN:root=R")
    p.add_argument("--val-dataset", required=True, help="dataset string, e.g. ImageNet:split=VAL:root=R")
    p.add_argument("--dims", type=int, nargs="+", default=None, help="prefix sizes (default: D, D/2, …, D/64)")
    p.add_argument("--nb-knn", type=int, nargs="+", default=list(DEFAULT_KS))
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--linear", action="store_true", help="also logistic regression on each prefix")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="logistic-regression backend for --linear")
    p.add_argument("--c-grid-size", type=int, default=45, help="C values in 10^linspace(-6, 5) for --linear")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_eval_args(get_args_parser(), argv)
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError("franca.eval.matryoshka draws matryoshka.png with matplotlib: pip install matplotlib")
    backbone = common.load_backbone_for_eval(args.weights, args.rasa_weights)
    settings = common.eval_settings(args, backbone, common.CLASSIFICATION_PROTOCOLS, classification=True)
    model = FeatureModel(backbone, settings.use_rasa_head)
    train = common.extract_labelled_features(model, args.train_dataset, settings, "train")
    val = common.extract_labelled_features(model, args.val_dataset, settings, "val")
    dims = _check_dims(args.dims or matryoshka_dims(train[0].shape[1]), train[0].shape[1])
    knn = matryoshka_knn(*train, *val, dims, tuple(args.nb_knn), args.temperature)
    record = {
        "weights": args.weights,
        "rasa_weights": args.rasa_weights,
        "train_dataset": args.train_dataset,
        "val_dataset": args.val_dataset,
        "embed_dim": train[0].shape[1],
        "dims": dims,
        "knn": {str(d): r for d, r in knn.items()},
    }
    linear = None
    if args.linear:
        backend = make_backend(args.backend)
        linear = matryoshka_linear(*train, *val, dims, c_grid(args.c_grid_size), backend, args.seed)
        record["linear"] = {"backend": backend.name, **{str(d): r for d, r in linear.items()}}
    out = Path(args.output_dir)
    plot_matryoshka(out / "matryoshka.png", knn, linear, title=f"Matryoshka slices: {args.weights}")
    datasets = {"train": args.train_dataset, "val": args.val_dataset}
    path = common.write_results(out, "matryoshka", record, common.run_metadata(args, settings, datasets))
    print(format_table(knn, linear))
    print(f"-> {path} and {out / 'matryoshka.png'}")
    return record


if __name__ == "__main__":
    main()
