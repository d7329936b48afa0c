"""Plumbing shared by the evaluation commands: backbone arguments, labelled feature extraction, atomic results."""

import argparse
import json
import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from franca.eval.features import default_device, extract_features


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every command shares: which backbone, how images are prepared, where results go."""
    parser.add_argument("--weights", required=True, help="hub name (franca_vitb14[:IN21K]) or checkpoint path / URL")
    parser.add_argument(
        "--rasa-weights", default=None, help="RASA head file: use RASA-debiased patch tokens (see docs/evaluation.md)"
    )
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--resize-size", type=int, default=256, help="evaluation transform: shorter side")
    parser.add_argument("--crop-size", type=int, default=224, help="evaluation transform: centre crop")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    parser.add_argument("--num-workers", type=int, default=4, help="data loader workers")


def load_backbone_for_eval(weights: str, rasa_weights: str | None) -> nn.Module:
    """The frozen backbone (with its RASA head attached when ``rasa_weights`` is given), in eval mode."""
    from franca.hub import load_backbone

    backbone = load_backbone(weights, rasa_weights=rasa_weights).eval()
    backbone.requires_grad_(False)
    return backbone


def make_eval_dataset(dataset_str: str, resize_size: int, crop_size: int) -> Dataset:
    from franca.data import make_classification_eval_transform, make_dataset

    return make_dataset(dataset_str, transform=make_classification_eval_transform(resize_size, crop_size))


def require_labels(labels: torch.Tensor, dataset_str: str) -> torch.Tensor:
    """Labels of a classification dataset; unlabelled images (target -1) cannot be evaluated."""
    if len(labels) == 0:
        raise ValueError(f"dataset {dataset_str!r} is empty")
    if (labels < 0).any():
        raise ValueError(
            f"dataset {dataset_str!r} has {int((labels < 0).sum())} unlabelled images (target -1); classification "
            "evaluation needs labels, e.g. an ImageFolder with one sub-folder per class"
        )
    return labels


def extract_labelled_features(
    model: nn.Module, dataset_str: str, args: argparse.Namespace, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, ...] and labels [N] of a dataset string under the evaluation transform."""
    dataset = make_eval_dataset(dataset_str, args.resize_size, args.crop_size)
    features, labels = extract_features(model, dataset, args.batch_size, args.num_workers, default_device(), name=name)
    return features, require_labels(labels, dataset_str)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_results(output_dir: str | os.PathLike, name: str, record: dict) -> Path:
    """``<output_dir>/results_eval_<name>.json``, written atomically."""
    path = Path(output_dir) / f"results_eval_{name}.json"
    write_bytes_atomic(path, (json.dumps(record, indent=2) + "\n").encode())
    return path
