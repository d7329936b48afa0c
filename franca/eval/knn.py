"""Weighted k-NN classification on frozen features (the DINO protocol; docs/evaluation.md).

Features are L2-normalised; each test sample takes its k most cosine-similar training samples, weights each by
exp(sim / T) (T = 0.07) and sums the weights per class; the class with the largest vote wins. Top-1 and top-5 accuracy
for each k in {10, 20, 100, 200}. Similarities are computed in chunks on the GPU when one is available. The vote and its
accuracies are :mod:`franca.utils.knn`, which the trainer's periodic k-NN uses too.

``--baselines random-init,pixels`` puts floors beside the model's numbers (:mod:`franca.eval.lib.floors`): the same
architecture at initialisation and the raw pixels, classified by the same vote on the same images.

``python -m franca.eval.knn --weights W --train-dataset STR --val-dataset STR --output-dir D [--baselines
random-init,pixels]``
"""

import argparse

from franca.eval.lib import common
from franca.eval.lib.floors import BASELINES, floor_models, parse_baselines
from franca.eval.lib.models import FeatureModel
from franca.utils.knn import DEFAULT_KS, knn_accuracies


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("franca.eval.knn", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    common.add_backbone_arguments(p)
    p.add_argument("--train-dataset", required=True, help="dataset string, e.g. ImageNet:split=TRAIN:root=R")
    p.add_argument("--val-dataset", required=True, help="dataset string, e.g. ImageNet:split=VAL:root=R")
    p.add_argument("--nb-knn", type=int, nargs="+", default=list(DEFAULT_KS))
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument(
        "--baselines",
        default="",
        metavar="NAMES",
        help=f"floors beside the model, comma-separated from {', '.join(BASELINES)} (default: none)",
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_eval_args(get_args_parser(), argv)
    baselines = parse_baselines(args.baselines) if args.baselines else []
    backbone = common.load_backbone_for_eval(args.weights, args.rasa_weights)
    settings = common.eval_settings(args, backbone, common.CLASSIFICATION_PROTOCOLS, classification=True)
    model = FeatureModel(backbone, use_rasa_head=settings.use_rasa_head)
    models, sources = floor_models(model, backbone, args.weights, baselines, args.seed, settings.use_rasa_head)
    train_features, train_labels = common.extract_labelled_features(models, args.train_dataset, settings, "train")
    val_features, val_labels = common.extract_labelled_features(models, args.val_dataset, settings, "val")
    train, val = models.split(train_features), models.split(val_features)
    ks, temperature = tuple(args.nb_knn), args.temperature
    results = knn_accuracies(train["model"], train_labels, val["model"], val_labels, ks=ks, temperature=temperature)
    record = {"weights": args.weights, "rasa_weights": args.rasa_weights, "temperature": args.temperature, **results}
    if baselines:
        record["floors"] = {
            name: {
                "source": sources[name],
                "feature_dim": train[name].shape[1],
                **knn_accuracies(train[name], train_labels, val[name], val_labels, ks=ks, temperature=temperature),
            }
            for name in baselines
        }
    datasets = {"train": args.train_dataset, "val": args.val_dataset}
    path = common.write_results(args.output_dir, "knn", record, common.run_metadata(args, settings, datasets))
    print(format_knn_table(record, baselines))
    for name in baselines:
        print(f"  {name}: {sources[name]}")
    print(f"results: {path}")
    return record


def format_knn_table(record: dict, baselines: list[str]) -> str:
    """Top-1 (top-5) per k, the model first and its floors beside it."""
    columns = ["model", *baselines]
    rows = [("k", *columns)]
    for k in (key for key in record if key.isdigit()):
        by_column = [record[k], *(record["floors"][name][k] for name in baselines)]
        rows.append((f"k={k}", *(f"{r['top1']:.2f}% ({r['top5']:.2f}%)" for r in by_column)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns) + 1)]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    return "k-NN top-1 (top-5):\n" + "\n".join(lines)


if __name__ == "__main__":
    main()
