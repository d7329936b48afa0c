"""Adapting a pretrained backbone to a new image domain, measured (benchmarks/RESULTS.md, "Adapt").

``python benchmarks/adapt.py --source W --target digits|lfw [--heads fresh|file] [--out runs/adapt]
[--runs two-stage naive scratch] [key=value ...]``

Source ``W``: a teacher export (e.g. the quickstart's ``eval/training_300/teacher_checkpoint.pth``, Fashion-MNIST).
Targets, real images that ship with the packages (written once as an ImageFolder at the source's native size, split
70/30 by image with a fixed seed, stratified by class):

- ``digits``: scikit-learn's ``load_digits`` (1,797 handwritten digits, 8x8, 10 classes), upsampled bicubically;
- ``lfw``: scikit-image's ``data.lfw_subset`` (200 25x25 crops from Labeled Faces in the Wild, 100 faces and 100
  non-face crops), upsampled bicubically.

Four models, each judged by CLS k-NN (k = 20, T = 0.07) on the target (bank = train split, classified = test split)
and on the source domain (Fashion-MNIST: bank = the first 10,000 train images, all 10,000 test images, as
``python -m franca.quickstart``):

- (a) ``frozen``: the source backbone as it is;
- (b) ``two-stage``: ``configs/train/adapt.yaml`` (heads first on the frozen backbone, then the backbone with a ramp
  and layer-wise decay);
- (c) ``naive``: the same recipe without stage 1 and with the recipe's lr on everything (what a plain restart does);
- (d) ``scratch``: Franca from random init on the target only, ``configs/train/quickstart.yaml`` (the source's recipe).

(b), (c) and (d) train the same iterations of the same batch. ``--heads fresh`` (default) starts (b) and (c) with fresh
heads, as from a released backbone (they ship no heads); ``--heads file`` with the source's own heads when it has
them. The drift of (b) and (c) (cosine of the final teacher's CLS / mean-patch features to the source's on the probe
images) comes from their ``training_metrics.json``. Writes ``<out>/<target>/<heads>_heads/adapt_results.json``;
finished runs are reused.
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import environment, markdown_table, write_json_atomic
from PIL import Image
from torch.utils.data import Subset

from franca.checkpoint import teacher_export_path
from franca.data.augmentations import make_classification_eval_transform
from franca.data.loaders import make_dataset
from franca.eval.lib.models import FeatureModel
from franca.hub import franca_from_checkpoint
from franca.train import train as trainer
from franca.train.config import load_config
from franca.utils.features import extract_features
from franca.utils.knn import knn_accuracies

REPO = Path(__file__).resolve().parents[1]
ADAPT = REPO / "configs" / "train" / "adapt.yaml"
SCRATCH = REPO / "configs" / "train" / "quickstart.yaml"
NAIVE = ["train.freeze_backbone_iterations=0", "optim.backbone_lr_mult=1.0", "optim.backbone_warmup_iterations=0"]
SOURCE_BANK, SOURCE_TEST = "FashionMNIST:split=train", "FashionMNIST:split=test"
K, TEMPERATURE = 20, 0.07
RUNS = ("two-stage", "naive", "scratch")


def target_images(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W], labels [N]) of a target."""
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return (digits.images * (255.0 / 16.0)).round().astype(np.uint8), digits.target
    if name == "lfw":
        from skimage import data

        faces = data.lfw_subset()  # 100 faces, then 100 non-face crops
        return (faces * 255).round().astype(np.uint8), np.repeat([0, 1], 100)
    raise SystemExit(f"--target {name!r} is unknown; choose digits or lfw")


def write_target(name: str, size: int, root: Path, seed: int = 0) -> Path:
    """The target as ``root/{train,test}/<class>/<index>.png`` at ``size`` px (once); 70/30 per class, seeded."""
    if (root / "test").is_dir():
        return root
    images, labels = target_images(name)
    rng = np.random.default_rng(seed)
    for label in np.unique(labels):
        indices = rng.permutation(np.flatnonzero(labels == label))
        cut = int(round(0.7 * len(indices)))
        for split, chosen in (("train", indices[:cut]), ("test", indices[cut:])):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in chosen:
                picture = Image.fromarray(images[index], mode="L").resize((size, size), Image.Resampling.BICUBIC)
                picture.save(folder / f"{index:05d}.png")
    return root


def train(config: Path, out: Path, overrides: list[str]) -> tuple[Path, float]:
    """Run (or reuse) one training; returns its final teacher export and its wall time (0 when reused)."""
    cfg = load_config(config, overrides)
    final = teacher_export_path(out, cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH)
    if final.is_file():
        return final, 0.0
    start = time.perf_counter()
    trainer.main(["--config-file", str(config), "--output-dir", str(out), *overrides])
    return final, time.perf_counter() - start


def knn(backbone: torch.nn.Module, bank, test) -> float:
    model = FeatureModel(backbone.eval(), readout="cls")
    train_features = extract_features(model, bank, batch_size=512, name="k-NN bank")
    test_features = extract_features(model, test, batch_size=512, name="k-NN test")
    return knn_accuracies(*train_features, *test_features, ks=(K,), temperature=TEMPERATURE)[str(K)]["top1"]


def last_drift(out: Path) -> dict[str, float]:
    records = [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]
    last = next((r for r in reversed(records) if "drift_cls_cos" in r), {})
    low = min((r["drift_cls_cos"] for r in records if "drift_cls_cos" in r), default=None)
    return {"drift_cls_cos": last.get("drift_cls_cos"), "drift_patch_cos": last.get("drift_patch_cos"), "min_cls": low}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        "benchmarks/adapt.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--source", required=True, help="the source teacher export (any file franca_from_checkpoint reads)"
    )
    parser.add_argument("--target", required=True, choices=("digits", "lfw"))
    parser.add_argument("--heads", default="fresh", choices=("fresh", "file"), help="heads of (b) and (c)")
    parser.add_argument("--out", default="runs/adapt")
    parser.add_argument(
        "--runs",
        nargs="+",
        default=list(RUNS),
        choices=list(RUNS),
        help="the trained models to compare with the frozen source (default: all three)",
    )
    parser.add_argument("opts", nargs="*", default=[], help="overrides for every training run")
    args = parser.parse_args(argv)
    source = franca_from_checkpoint(args.source)
    size = source.config.img_size
    data = write_target(args.target, size, Path(args.out) / args.target / "data")
    out = Path(args.out) / args.target / f"{args.heads}_heads"
    target = [f"train.dataset_path=ImageFolder:root={data / 'train'}", *args.opts]
    heads = "false" if args.heads == "fresh" else "auto"
    adapt = [f"student.pretrained_weights={args.source}", f"student.pretrained_heads={heads}", *target]

    recipes = {
        "two-stage": (ADAPT, out / "two_stage", adapt),
        "naive": (ADAPT, out / "naive", [*adapt, *NAIVE]),
        "scratch": (SCRATCH, out / "scratch", target),
    }
    runs = {name: train(*recipes[name]) for name in RUNS if name in args.runs}
    transform = make_classification_eval_transform(size, size)
    target_bank = make_dataset(f"ImageFolder:root={data / 'train'}", transform=transform)
    target_test = make_dataset(f"ImageFolder:root={data / 'test'}", transform=transform)
    source_bank = Subset(make_dataset(SOURCE_BANK, transform=transform), range(10000))
    source_test = make_dataset(SOURCE_TEST, transform=transform)
    rows = {}
    for name, (export, seconds) in {"frozen": (Path(args.source), 0.0), **runs}.items():
        backbone = franca_from_checkpoint(export)
        rows[name] = {
            "target_knn": knn(backbone, target_bank, target_test),
            "source_knn": knn(backbone, source_bank, source_test),
            "train_seconds": seconds,
            **(last_drift(export.parents[2]) if name in ("two-stage", "naive") else {}),
        }
        print(name, rows[name], flush=True)
    payload = {
        "environment": environment(torch.device("cpu")),
        "command": shlex.join([sys.executable, *sys.argv]),
        "source": args.source,
        "target": args.target,
        "heads": args.heads,
        "target_images": {"train": len(target_bank), "test": len(target_test)},
        "results": rows,
    }
    write_json_atomic(out / "adapt_results.json", payload)
    headers = ["model", "target k-NN", "source k-NN", "drift CLS (final / lowest)", "drift patch"]
    table = [
        [
            name,
            f"{r['target_knn']:.2f}%",
            f"{r['source_knn']:.2f}%",
            f"{r['drift_cls_cos']:.3f} / {r['min_cls']:.3f}" if "drift_cls_cos" in r else None,
            f"{r['drift_patch_cos']:.3f}" if "drift_patch_cos" in r else None,
        ]
        for name, r in rows.items()
    ]
    print(markdown_table(headers, table))
    return payload


if __name__ == "__main__":
    main()
