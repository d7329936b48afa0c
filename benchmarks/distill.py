"""Distillation numbers (benchmarks/RESULTS.md, "Distil (issue #24)"): CLS k-NN, parameters and inference speed of
teachers and students side by side.

``PYTHONPATH=. python benchmarks/distill.py --weights NAME=FILE [NAME=FILE ...] [--image-size S] [--holdout N]
[--out F.json]``

Each FILE is anything :func:`franca.hub.franca_from_checkpoint` reads (a teacher or student export, a distilled timm
student). The k-NN is the quickstart's protocol (``franca/quickstart.py``): bank = the first 10,000 Fashion-MNIST
training images, all 10,000 test images, k = 20, T = 0.07, on the CLS token, images resized and centre-cropped to
``--image-size`` (default: the model's training size). ``--holdout N`` classifies the last N training images instead
(outside the bank): the number to choose between variants by, so that the test split is only reported. Inference:
images per second of ``forward_features`` at that size, batch 256, fp32, eval mode, on this machine's CPU: the
models of one size take turns for 10 rounds (after one warm-up round) and each keeps its fastest batch, so all meet
the same load of a shared machine.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import environment, markdown_table, write_json_atomic  # noqa: E402
from franca.data.augmentations import make_classification_eval_transform  # noqa: E402
from franca.data.loaders import make_dataset  # noqa: E402
from franca.eval.lib.models import FeatureModel  # noqa: E402
from franca.hub import franca_from_checkpoint  # noqa: E402
from franca.utils.features import extract_features  # noqa: E402
from franca.utils.knn import knn_accuracies  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("distill", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--weights", nargs="+", required=True, metavar="NAME=FILE", help="models to measure, by name")
    p.add_argument("--image-size", type=int, default=None, help="evaluation size (default: each model's own)")
    p.add_argument("--train-dataset", default="FashionMNIST:split=train")
    p.add_argument("--test-dataset", default="FashionMNIST:split=test")
    p.add_argument("--bank", type=int, default=10000, help="first N training images as the k-NN bank")
    p.add_argument(
        "--holdout",
        type=int,
        default=0,
        help="classify the last N training images instead of the test split (choosing between variants without "
        "looking at the test split)",
    )
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--out", default=None, help="JSON file for the rows")
    return p


@torch.no_grad()
def images_per_second(backbones: dict[str, torch.nn.Module], size: int, batch: int = 256, rounds: int = 10) -> dict:
    """Images per second of each backbone's ``forward_features`` on one batch: the fastest of ``rounds`` rounds in
    which every backbone runs once in turn (so that all of them meet the same load of the shared machine)."""
    images = torch.randn(batch, 3, size, size)
    best = dict.fromkeys(backbones, float("inf"))
    for round_ in range(rounds + 1):
        for name, backbone in backbones.items():
            start = time.perf_counter()
            backbone.forward_features(images)
            if round_:  # round 0 warms up
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: batch / seconds for name, seconds in best.items()}


def measure(name: str, weights: str, args: argparse.Namespace) -> dict:
    backbone = franca_from_checkpoint(weights).eval()
    size = args.image_size or int(backbone.img_size)
    transform = make_classification_eval_transform(resize_size=size, crop_size=size)
    bank = make_dataset(args.train_dataset, transform=transform)
    bank = Subset(bank, range(min(args.bank, len(bank))))
    if args.holdout:
        full = make_dataset(args.train_dataset, transform=transform)
        test = Subset(full, range(len(full) - args.holdout, len(full)))
    else:
        test = make_dataset(args.test_dataset, transform=transform)
    model = FeatureModel(backbone, readout="cls")
    train_features = extract_features(model, bank, batch_size=512, name=f"{name} bank")
    test_features = extract_features(model, test, batch_size=512, name=f"{name} test")
    knn = knn_accuracies(*train_features, *test_features, ks=(args.k,))[str(args.k)]
    return {
        "name": name,
        "weights": weights,
        "image_size": size,
        "queries": f"last {args.holdout} of {args.train_dataset}" if args.holdout else args.test_dataset,
        "parameters": sum(p.numel() for p in backbone.parameters()),
        "knn_top1": knn["top1"],
        "knn_top5": knn["top5"],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for item in args.weights:
        name, _, weights = item.partition("=")
        rows.append(measure(name, weights, args))
        print(rows[-1], flush=True)
    for size in sorted({r["image_size"] for r in rows}):
        named = {r["name"]: franca_from_checkpoint(r["weights"]).eval() for r in rows if r["image_size"] == size}
        speeds = images_per_second(named, size)
        for r in rows:
            r["images_per_s"] = speeds.get(r["name"], r.get("images_per_s"))
    headers = ["model", "px", "parameters", f"CLS k-NN top-1 (k={args.k})", "img/s"]
    table = [
        [r["name"], r["image_size"], f"{r['parameters']:,}", f"{r['knn_top1']:.2f}", r["images_per_s"]] for r in rows
    ]
    print(markdown_table(headers, table))
    if args.out:
        write_json_atomic(args.out, {"environment": environment(torch.device("cpu")), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
