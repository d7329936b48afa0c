"""Weighted k-NN classification on frozen features (the DINO protocol; docs/evaluation.md).

Features are L2-normalised; each test sample takes its k most cosine-similar training samples, weights each by
exp(sim / T) (T = 0.07) and sums the weights per class; the class with the largest vote wins. Top-1 and top-5 accuracy
for each k in {10, 20, 100, 200}. Similarities are computed in chunks on the GPU when one is available. The vote itself
is :func:`franca.utils.knn.knn_classify`, which the trainer's periodic k-NN uses too.

``python -m franca.eval.knn --weights W --train-dataset STR --val-dataset STR --output-dir D``
"""

import argparse

import torch

from franca.eval.common import (
    CLASSIFICATION_PROTOCOLS,
    add_backbone_arguments,
    eval_settings,
    extract_labelled_features,
    load_backbone_for_eval,
    parse_eval_args,
    run_metadata,
    write_results,
)
from franca.eval.metrics import topk_accuracy
from franca.eval.models import FeatureModel
from franca.utils.knn import DEFAULT_KS, knn_classify

__all__ = ["DEFAULT_KS", "knn_accuracies", "knn_classify", "main"]


def knn_accuracies(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: tuple[int, ...] = DEFAULT_KS,
    temperature: float = 0.07,
) -> dict[str, dict[str, float]]:
    """``{str(k): {"top1": %, "top5": %}}`` for each k."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    votes = knn_classify(train_features, train_labels, test_features, ks, temperature, num_classes)
    return {
        f"{k}": {"top1": topk_accuracy(v, test_labels, 1), "top5": topk_accuracy(v, test_labels, 5)}
        for k, v in votes.items()
    }


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("franca.eval.knn", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_backbone_arguments(p)
    p.add_argument("--train-dataset", required=True, help="dataset string, e.g. ImageNet:split=TRAIN:root=R")
    p.add_argument("--val-dataset", required=True, help="dataset string, e.g. ImageNet:split=VAL:root=R")
    p.add_argument("--nb-knn", type=int, nargs="+", default=list(DEFAULT_KS))
    p.add_argument("--temperature", type=float, default=0.07)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parse_eval_args(get_args_parser(), argv)
    backbone = load_backbone_for_eval(args.weights, args.rasa_weights)
    settings = eval_settings(args, backbone, CLASSIFICATION_PROTOCOLS, classification=True)
    model = FeatureModel(backbone, use_rasa_head=settings.use_rasa_head)
    train = extract_labelled_features(model, args.train_dataset, settings, "train")
    val = extract_labelled_features(model, args.val_dataset, settings, "val")
    results = knn_accuracies(*train, *val, ks=tuple(args.nb_knn), temperature=args.temperature)
    record = {"weights": args.weights, "rasa_weights": args.rasa_weights, "temperature": args.temperature, **results}
    datasets = {"train": args.train_dataset, "val": args.val_dataset}
    path = write_results(args.output_dir, "knn", record, run_metadata(args, settings, datasets))
    for k, r in results.items():
        print(f"k={k}: top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%")
    print(f"results: {path}")
    return record


if __name__ == "__main__":
    main()
