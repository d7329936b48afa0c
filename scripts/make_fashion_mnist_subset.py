"""Regenerates franca/assets/fashion_mnist: a class-balanced subset of Fashion-MNIST in its original idx format.

The subset keeps, for every class, the first ``--train-per-class`` (``--test-per-class``) images of that class in the
original file order, and lists them in that order; the output is byte-identical on every run (gzip timestamp 0).

    python scripts/make_fashion_mnist_subset.py --source /usr/share/datasets/fashion-mnist
"""

import argparse
from pathlib import Path

import numpy as np

from franca.data.datasets.fashion_mnist import BUNDLED_ROOT, SPLIT_PREFIXES, read_idx, split_files, write_idx


def balanced_first_indices(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Sorted indices of the first ``per_class`` occurrences of every label."""
    chosen = []
    for label in np.unique(labels):
        occurrences = np.flatnonzero(labels == label)
        if len(occurrences) < per_class:
            raise ValueError(f"class {label} has only {len(occurrences)} images; cannot take {per_class}")
        chosen.append(occurrences[:per_class])
    return np.sort(np.concatenate(chosen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--output", type=Path, default=BUNDLED_ROOT)
    parser.add_argument("--train-per-class", type=int, default=400)
    parser.add_argument("--test-per-class", type=int, default=100)
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        files = split_files(args.source, split)
        if files is None:
            raise SystemExit(
                f"{args.source} lacks the Fashion-MNIST {split} idx files; apt-get install dataset-fashion-mnist"
            )
        images, labels = read_idx(files[0]), read_idx(files[1])
        keep = balanced_first_indices(labels, per_class)
        prefix = SPLIT_PREFIXES[split]
        write_idx(args.output / f"{prefix}-images-idx3-ubyte.gz", images[keep])
        write_idx(args.output / f"{prefix}-labels-idx1-ubyte.gz", labels[keep])
        print(f"{split}: {len(keep)} images ({per_class} per class) → {args.output}")


if __name__ == "__main__":
    main()
