"""Distillation numbers (benchmarks/RESULTS.md, "Distil (issue #24)"): CLS k-NN, parameters and inference speed of
teachers and students side by side.

``PYTHONPATH=. python benchmarks/distill.py --weights NAME=FILE [NAME=FILE ...] [--image-size S] [--out F.json]``

Each FILE is anything :func:`franca.hub.franca_from_checkpoint` reads (a teacher or student export, a distilled timm
student). The k-NN is the quickstart's protocol (``franca/quickstart.py``): bank = the first 10,000 Fashion-MNIST
training images, all 10,000 test images, k = 20, T = 0.07, on the CLS token, images resized and centre-cropped to
``--image-size`` (default: the model's training size). Inference: images per second of ``forward_features`` at that
size, batch 256, fp32, eval mode, on this machine's CPU (3 warm-up, then the median of 10 timed batches).
"""

import argparse
import statistics
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
from franca.eval.features import extract_features  # noqa: E402
from franca.eval.knn import knn_accuracies  # noqa: E402
from franca.eval.models import FeatureModel  # noqa: E402
from franca.hub import franca_from_checkpoint  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("distill", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--weights", nargs="+", required=True, metavar="NAME=FILE", help="models to measure, by name")
    p.add_argument("--image-size", type=int, default=None, help="evaluation size (default: each model's own)")
    p.add_argument("--train-dataset", default="FashionMNIST:split=train")
    p.add_argument("--test-dataset", default="FashionMNIST:split=test")
    p.add_argument("--bank", type=int, default=10000, help="first N training images as the k-NN bank")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--out", default=None, help="JSON file for the rows")
    return p


@torch.no_grad()
def images_per_second(
    backbone: torch.nn.Module, size: int, batch: int = 256, warmup: int = 3, timed: int = 10
) -> float:
    images = torch.randn(batch, 3, size, size)
    for _ in range(3):
        backbone.forward_features(images)
    times = []
    for _ in range(timed):
        start = time.perf_counter()
        backbone.forward_features(images)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def measure(name: str, weights: str, args: argparse.Namespace) -> dict:
    backbone = franca_from_checkpoint(weights).eval()
    size = args.image_size or int(backbone.img_size)
    transform = make_classification_eval_transform(resize_size=size, crop_size=size)
    bank = make_dataset(args.train_dataset, transform=transform)
    bank = Subset(bank, range(min(args.bank, len(bank))))
    test = make_dataset(args.test_dataset, transform=transform)
    model = FeatureModel(backbone, readout="cls")
    train_features = extract_features(model, bank, batch_size=512, name=f"{name} bank")
    test_features = extract_features(model, test, batch_size=512, name=f"{name} test")
    knn = knn_accuracies(*train_features, *test_features, ks=(args.k,))[str(args.k)]
    return {
        "name": name,
        "weights": weights,
        "image_size": size,
        "parameters": sum(p.numel() for p in backbone.parameters()),
        "knn_top1": knn["top1"],
        "knn_top5": knn["top5"],
        "images_per_s": images_per_second(backbone, size),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for item in args.weights:
        name, _, weights = item.partition("=")
        rows.append(measure(name, weights, args))
        print(rows[-1], flush=True)
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
