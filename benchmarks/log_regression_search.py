"""Time the logistic-regression C search (franca.eval.log_regression) on 1.5k × 128 features, original vs scaled.

Features (``--features``):
- ``teacher``: x ~ N(0, I₁₂₈), y = argmax(x T) for a fixed random teacher T with 10 classes: linearly separable,
  with small margins;
- ``fashion``: the first 1,500 training and 500 test images of the bundled Fashion-MNIST
  (franca/assets/fashion_mnist) through a randomly initialised 2-block ViT of width 128 (CLS token).

``python benchmarks/log_regression_search.py --features fashion --search scaled --backend sklearn``
"""

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from franca.eval.lib.logreg_backends import make_backend
from franca.eval.lib.logreg_search import log_regression_eval, original_search, scaled_search
from franca.models.vision_transformer import build_vit

FASHION_MNIST = Path(__file__).resolve().parents[1] / "franca" / "assets" / "fashion_mnist"
NUM_CLASSES = 10
DIM = 128


def teacher_features(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ N(0, I), labels = argmax(x @ T) with T fixed: separable by construction."""
    teacher = torch.randn(DIM, NUM_CLASSES, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x, (x @ teacher).argmax(1)


def read_idx(name: str, header: int) -> np.ndarray:
    with gzip.open(FASHION_MNIST / name) as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


@torch.no_grad()
def fashion_features(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS tokens of a random ViT (seed 0) on the first ``n`` images of ``split`` (train or t10k), as float64."""
    images = torch.from_numpy(read_idx(f"{split}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)[:n].copy())
    labels = torch.from_numpy(read_idx(f"{split}-labels-idx1-ubyte.gz", 8)[:n].astype(np.int64))
    torch.manual_seed(0)
    vit = build_vit("vit_tiny", depth=2, patch_size=8, img_size=32, embed_dim=DIM, num_heads=2).eval()
    pixels = F.interpolate(images[:, None].float() / 255.0, size=32, mode="bilinear").repeat(1, 3, 1, 1)
    pixels = (pixels - 0.5) / 0.25
    return vit.forward_features(pixels)["x_norm_clstoken"].double(), labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--features", choices=("teacher", "fashion"), default="teacher")
    p.add_argument("--search", choices=("original", "scaled"), default="scaled")
    p.add_argument("--backend", choices=("sklearn", "torch"), default="sklearn")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.features == "teacher":
        train, val = teacher_features(1500, seed=0), teacher_features(500, seed=1)
    else:
        train, val = fashion_features("train", 1500), fashion_features("t10k", 500)
    settings = original_search() if args.search == "original" else scaled_search(*train, NUM_CLASSES)
    start = time.perf_counter()
    result = log_regression_eval(
        *train,
        *val,
        settings.c_values,
        make_backend(args.backend),
        tol=settings.tol,
        patience=settings.patience,
        warm_start=settings.warm_start,
    )
    print(
        f"{args.features} {args.search} {args.backend}: {time.perf_counter() - start:.1f} s, "
        f"{len(result['holdout_top1'])}/{len(settings.c_values)} C values, tol {settings.tol}, "
        f"best C {result['best_c']:.4g}, val top-1 {result['top1']:.2f}%"
    )


if __name__ == "__main__":
    main()
