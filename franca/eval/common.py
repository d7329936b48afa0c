"""Plumbing shared by the evaluation commands: backbone arguments, labelled feature extraction, atomic results."""

import argparse
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from franca.data.image_decoding import ImageDecoding, parse_background, parse_max_value
from franca.eval.features import default_device, extract_features
from franca.utils.atomic import atomic_write


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
    parser.add_argument(
        "--alpha-background",
        type=_argument_type(parse_background),
        default="white",
        help="colour transparent pixels are composited onto: white, black, '#RRGGBB' or R,G,B (default: white)",
    )
    parser.add_argument(
        "--image-max-value",
        type=_argument_type(parse_max_value),
        default="0",
        help="16/32-bit images: 0 = scale each by its own range, else the declared maximum, e.g. 4095 (default: 0)",
    )


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` that shows the parser's own message (what is accepted) for a bad value."""

    def parse_argument(value: str) -> Any:
        try:
            return parse(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse_argument


def image_decoding_from_args(args: argparse.Namespace) -> ImageDecoding:
    """The decoding options of ``--alpha-background`` and ``--image-max-value``."""
    return ImageDecoding(args.alpha_background, args.image_max_value)


def load_backbone_for_eval(weights: str, rasa_weights: str | None) -> nn.Module:
    """The frozen backbone (with its RASA head attached when ``rasa_weights`` is given), in eval mode."""
    from franca.hub import load_backbone

    backbone = load_backbone(weights, rasa_weights=rasa_weights).eval()
    backbone.requires_grad_(False)
    return backbone


def make_eval_dataset(
    dataset_str: str, resize_size: int, crop_size: int, decoding: ImageDecoding | None = None
) -> Dataset:
    from franca.data import make_classification_eval_transform, make_dataset

    transform = make_classification_eval_transform(resize_size, crop_size)
    return make_dataset(dataset_str, transform=transform, decoding=decoding)


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
    dataset = make_eval_dataset(dataset_str, args.resize_size, args.crop_size, image_decoding_from_args(args))
    features, labels = extract_features(model, dataset, args.batch_size, args.num_workers, default_device(), name=name)
    return features, require_labels(labels, dataset_str)


def write_results(output_dir: str | os.PathLike, name: str, record: dict) -> Path:
    """``<output_dir>/results_eval_<name>.json``, written atomically."""
    path = Path(output_dir) / f"results_eval_{name}.json"
    atomic_write(path, json.dumps(record, indent=2) + "\n")
    return path
