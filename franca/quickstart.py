"""The main job: pretrain a tiny Franca ViT on real Fashion-MNIST photos, then judge it by k-NN.

``python -m franca.quickstart [--output-dir DIR] [config overrides ...]`` trains with ``configs/train/quickstart.yaml``
(rerunning resumes), then classifies the Fashion-MNIST test split by weighted k-NN on
raw pixels, the same ViT at random initialisation and the pretrained teacher (CLS token and mean patch token each).
The data is Debian's full ``dataset-fashion-mnist`` when installed, else the subset shipped in ``franca/assets``.
"""

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import Subset

from franca.checkpoint import teacher_export_path
from franca.data.augmentations import make_classification_eval_transform
from franca.data.loaders import make_dataset
from franca.eval.lib.floors import PixelFeatures
from franca.eval.lib.models import FeatureModel
from franca.hub import load_backbone
from franca.train import train as trainer
from franca.train.config import apply_scaling_rules, load_config
from franca.train.ssl_meta_arch import build_backbone
from franca.utils.features import extract_features
from franca.utils.knn import knn_accuracies

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train" / "quickstart.yaml"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("franca.quickstart", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", default=str(DEFAULT_CONFIG))
    p.add_argument("--output-dir", default="runs/quickstart")
    p.add_argument("--test-dataset", default="FashionMNIST:split=test")
    p.add_argument(
        "--knn-train-samples", type=int, default=10000, help="first N training images as the k-NN bank (0 = all)"
    )
    p.add_argument("--knn-test-samples", type=int, default=0, help="use only the first N test images")
    p.add_argument("--k", type=int, default=20, help="neighbours for the headline k-NN accuracy")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("opts", nargs="*", default=[], help="config overrides, e.g. optim.epochs=2")
    return p


def _first(dataset, n: int):
    return Subset(dataset, range(min(n, len(dataset)))) if n else dataset


def evaluate(cfg, teacher_file: Path, args) -> dict:
    size = cfg.crops.global_crops_size
    transform = make_classification_eval_transform(resize_size=size, crop_size=size)
    train_set = _first(make_dataset(cfg.train.dataset_path, transform=transform), args.knn_train_samples)
    test_set = _first(make_dataset(args.test_dataset, transform=transform), args.knn_test_samples)

    torch.manual_seed(cfg.train.seed)
    random_vit = build_backbone(cfg, drop_path=False)
    pretrained = load_backbone(teacher_file)

    ks = tuple(sorted({10, args.k, 100, 200}))
    results = {}
    # CLS and mean patch token side by side, one forward for both: at random initialisation the CLS token is nearly
    # the same for every image, so the mean patch token is the honest random-init floor
    models = {
        "raw pixels": PixelFeatures(),
        "random-init ViT": FeatureModel(random_vit, readout="cls_mean_patch"),
        "Franca": FeatureModel(pretrained, readout="cls_mean_patch"),
    }
    for name, model in models.items():
        train, train_labels = extract_features(model, train_set, batch_size=512, name=f"{name} train")
        test, test_labels = extract_features(model, test_set, batch_size=512, name=f"{name} test")
        if name == "raw pixels":
            results[name] = knn_accuracies(train, train_labels, test, test_labels, ks=ks)
            continue
        width = train.shape[1] // 2
        for part, columns in (("CLS", slice(None, width)), ("mean patch", slice(width, None))):
            results[f"{name}, {part}"] = knn_accuracies(
                train[:, columns], train_labels, test[:, columns], test_labels, ks=ks
            )
    return results


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    if not Path(args.config_file).is_file():
        raise SystemExit(f"quickstart config {args.config_file} not found; pass --config-file (it lives in configs/)")
    train_argv = ["--config-file", args.config_file, "--output-dir", args.output_dir, *args.opts]
    trainer.main(train_argv + (["--no-resume"] if args.no_resume else []))

    cfg = load_config(args.config_file, args.opts)
    apply_scaling_rules(cfg, world_size=1)
    out = Path(args.output_dir)
    teacher_file = teacher_export_path(out, cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH)
    results = evaluate(cfg, teacher_file, args)

    print(f"\nk-NN (k={args.k}) on {args.test_dataset}:")
    print(f"  {'features':<30} {'top-1':>7} {'top-5':>7}")
    for name, by_k in results.items():
        r = by_k[str(args.k)]
        print(f"  {name:<30} {r['top1']:>6.2f}% {r['top5']:>6.2f}%")
    record = {"k": args.k, "test_dataset": args.test_dataset, "teacher": str(teacher_file), "knn": results}
    (out / "quickstart_results.json").write_text(json.dumps(record, indent=2))
    print(f"\nresults: {out / 'quickstart_results.json'}; loss curves: {out / 'loss_curves.png'}")
    return record


if __name__ == "__main__":
    main()
