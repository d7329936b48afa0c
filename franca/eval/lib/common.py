"""Plumbing shared by the evaluation commands: one argument surface, sizes that follow the model, labelled feature
extraction, and atomic results files that say what they measured (docs/evaluation.md, "Shared flags")."""

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from franca.data.image_decoding import DEFAULT_DECODING, ImageDecoding, parse_background, parse_max_value
from franca.eval.lib.provenance import results_metadata
from franca.eval.lib.segmentation import check_input_size, parse_size
from franca.utils.atomic import atomic_write
from franca.utils.features import default_device, extract_features

CLASSIFICATION_PROTOCOLS = {"dinov2": (224, 224)}
CLASSIFICATION_RESIZE_RATIO = 256 / 224


def default_num_workers() -> int:
    """Data-loader workers the machine can spare: min(4, CPUs − 1), at least 0."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


class CanonicalName(argparse.Action):
    """Stores the value under the first option name; an older name still works and prints a deprecation note."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string is not None and option_string != self.option_strings[0]:
            print(f"note: {option_string} is deprecated; use {self.option_strings[0]}", file=sys.stderr)
        setattr(namespace, self.dest, values)


class DeprecatedOption(argparse.Action):
    """An option kept for old command lines: it still takes effect, and using it prints the note given as help."""

    def __init__(self, *args, note: str, **kwargs):
        super().__init__(*args, help=f"deprecated: {note}", **kwargs)
        self.note = note

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is deprecated: {self.note}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_image_size_argument(
    parser: argparse.ArgumentParser, old_names: tuple[str, ...] = (), protocols: dict | None = None
) -> None:
    """``--image-size S | H W`` (default: the checkpoint's training size) and, with ``protocols``, ``--protocol``."""
    parser.add_argument(
        "--image-size",
        *old_names,
        dest="image_size",
        type=int,
        nargs="+",
        default=None,
        action=CanonicalName,
        metavar="SIZE",
        help="S or H W, a multiple of the patch size (default: the size the checkpoint was trained at)"
        + "".join(f"; {name} is its deprecated old name" for name in old_names),
    )
    if protocols:
        sizes = ", ".join(f"{name}: {h}x{w}" for name, (h, w) in protocols.items())
        parser.add_argument(
            "--protocol", choices=sorted(protocols), default=None, help=f"a published protocol's sizes ({sizes})"
        )


def add_eval_arguments(
    parser: argparse.ArgumentParser,
    batch_size: int,
    old_size_names: tuple[str, ...] = (),
    protocols: dict | None = None,
) -> None:
    """The flags every evaluation command shares: backbone, output folder, image size, loader, seed, decoding."""
    parser.add_argument("--weights", required=True, help="hub name (franca_vitb14[:IN21K]) or checkpoint path / URL")
    parser.add_argument(
        "--rasa-weights", default=None, help="RASA head file: use RASA-debiased patch tokens (see docs/evaluation.md)"
    )
    parser.add_argument(
        "--output-dir",
        "--out",
        dest="output_dir",
        required=True,
        action=CanonicalName,
        help="folder of results_eval_<name>.json and other outputs; --out is its deprecated old name",
    )
    add_image_size_argument(parser, old_size_names, protocols)
    parser.add_argument("--batch-size", type=int, default=batch_size, help="images per forward pass")
    parser.add_argument(
        "--num-workers", type=int, default=default_num_workers(), help="data loader workers (default: min(4, CPUs-1))"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (splits, sampling, init)")
    add_decoding_arguments(parser)


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """``--alpha-background`` and ``--image-max-value``; unset, each follows the checkpoint's stored decoding."""
    parser.add_argument(
        "--alpha-background",
        type=_argument_type(parse_background),
        default=None,
        help="colour transparent pixels are composited onto: white, black, '#RRGGBB' or R,G,B (default: the "
        "checkpoint's, else white)",
    )
    parser.add_argument(
        "--image-max-value",
        type=_argument_type(lambda value: parse_max_value(value) or 0.0),
        default=None,
        help="16/32-bit images: 0 = scale each by its own range, else the declared maximum, e.g. 4095 (default: the "
        "checkpoint's, else 0)",
    )


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    """The shared flags as the classification commands (knn, linear, log_regression, matryoshka, ood) use them."""
    add_eval_arguments(parser, batch_size=256, old_size_names=("--crop-size",), protocols=CLASSIFICATION_PROTOCOLS)
    parser.add_argument(
        "--resize-size",
        type=int,
        default=None,
        action=DeprecatedOption,
        note="the shorter side is resized to round(image size * 256/224); this flag still overrides it",
    )


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` that shows the parser's own message (what is accepted) for a bad value."""

    def parse_argument(value: str) -> Any:
        try:
            return parse(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse_argument


def parse_eval_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parsed flags, plus the command line as typed (``command_line``) and the start time (``started``)."""
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["python", "-m", parser.prog, *(sys.argv[1:] if argv is None else argv)])
    args.started = time.perf_counter()
    return args


def resolve_decoding(args: argparse.Namespace, backbone: nn.Module) -> tuple[ImageDecoding, str]:
    """(decoding, where it came from): each of ``--alpha-background`` / ``--image-max-value`` when given, else the
    checkpoint's stored ``input_decoding``, else the default (white, each image by its own range)."""
    stored = getattr(backbone, "input_decoding", None)
    base = ImageDecoding.from_record(stored) if stored else DEFAULT_DECODING
    flags = {"background": getattr(args, "alpha_background", None), "max_value": getattr(args, "image_max_value", None)}
    given = {field: value for field, value in flags.items() if value is not None}
    decoding = replace(base, **{field: value or None for field, value in given.items()})
    if given:
        source = "flags" if len(given) == 2 or not stored else "flags and the checkpoint's"
    else:
        source = "the checkpoint's" if stored else "default: the checkpoint records none"
    return decoding, source


@dataclass(frozen=True)
class EvalSettings:
    """The resolved settings every command runs with (the ``run_*`` functions take these instead of long argument
    lists). ``resize_size`` is the classification transform's shorter side; None for dense commands."""

    image_size: tuple[int, int]
    batch_size: int = 32
    num_workers: int = 0
    seed: int = 0
    use_rasa_head: bool = False
    decoding: ImageDecoding = DEFAULT_DECODING
    resize_size: int | None = None
    size_source: str = "given"
    decoding_source: str = "given"

    def sizes(self) -> dict:
        """The sizes used, as recorded in the results' metadata."""
        sizes = {"image_size": list(self.image_size), "image_size_from": self.size_source}
        if self.resize_size is not None:
            sizes["resize_size"] = self.resize_size
        return sizes

    def input_decoding(self) -> dict:
        """The image decoding used and where it came from, as recorded in the results' metadata."""
        return {**self.decoding.to_record(), "from": self.decoding_source}

    def describe(self) -> str:
        """The ``sizes:`` line every command prints."""
        resize = f", resize shorter side to {self.resize_size}" if self.resize_size is not None else ""
        size = f"{self.image_size[0]}x{self.image_size[1]} ({self.size_source}){resize}"
        return f"sizes: image {size}; decoding {self.decoding.describe()} ({self.decoding_source})"


def resolve_image_size(
    requested: list[int] | None, protocol: str | None, protocols: dict | None, backbone: nn.Module
) -> tuple[tuple[int, int], str]:
    """(size, where it came from): ``--image-size``, else the named protocol's, else the checkpoint's ``img_size``;
    checked to be a multiple of the patch size."""
    if requested:
        size, source = parse_size(requested), "--image-size"
    elif protocol is not None:
        size, source = tuple(protocols[protocol]), f"protocol {protocol}"
    else:
        trained = getattr(backbone, "img_size", None)
        if trained is None:
            raise ValueError(f"{type(backbone).__name__} has no img_size to default to: pass --image-size")
        size = tuple(trained) if isinstance(trained, (tuple, list)) else (int(trained), int(trained))
        source = "the checkpoint's img_size"
    check_input_size(size, backbone.patch_size)
    return size, source


def classification_resize(crop: int) -> int:
    """The shorter side before the centre crop: crop · 256/224 rounded (DINOv2's 256/224)."""
    return round(crop * CLASSIFICATION_RESIZE_RATIO)


def eval_settings(
    args: argparse.Namespace, backbone: nn.Module, protocols: dict | None = None, classification: bool = False
) -> EvalSettings:
    """The settings of a parsed command line for ``backbone``; prints the sizes used (one line)."""
    size, source = resolve_image_size(args.image_size, getattr(args, "protocol", None), protocols, backbone)
    resize = None
    if classification:
        if size[0] != size[1]:
            raise ValueError(f"--image-size {size[0]} {size[1]}: classification uses a square crop; give one size")
        resize = args.resize_size or classification_resize(size[0])
    decoding, decoding_source = resolve_decoding(args, backbone)
    settings = EvalSettings(
        image_size=size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        seed=args.seed,
        use_rasa_head=args.rasa_weights is not None,
        decoding=decoding,
        resize_size=resize,
        size_source=source,
        decoding_source=decoding_source,
    )
    print(settings.describe(), flush=True)
    return settings


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


def extract_eval_features(
    model: nn.Module, dataset_str: str, settings: EvalSettings, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, ...] and targets [N] of a dataset string under the classification evaluation transform."""
    dataset = make_eval_dataset(dataset_str, settings.resize_size, settings.image_size[0], settings.decoding)
    return extract_features(model, dataset, settings.batch_size, settings.num_workers, default_device(), name=name)


def extract_labelled_features(
    model: nn.Module, dataset_str: str, settings: EvalSettings, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, ...] and labels [N] of a labelled dataset (see :func:`extract_eval_features`)."""
    features, labels = extract_eval_features(model, dataset_str, settings, name)
    return features, require_labels(labels, dataset_str)


def run_metadata(args: argparse.Namespace, settings: EvalSettings, datasets: dict, sizes: dict | None = None) -> dict:
    """The metadata block of a results file (:func:`franca.eval.lib.provenance.results_metadata`) of a parsed command
    line; ``sizes`` adds command-specific sizes to the shared ones."""
    all_sizes = {**settings.sizes(), **(sizes or {})}
    return results_metadata(
        args.command_line,
        args.weights,
        args.rasa_weights,
        datasets,
        all_sizes,
        settings.seed,
        args.started,
        settings.input_decoding(),
    )


def write_results(output_dir: str | os.PathLike, name: str, record: dict, metadata: dict) -> Path:
    """``<output_dir>/results_eval_<name>.json`` (the record plus its ``metadata`` block), written atomically."""
    path = Path(output_dir) / f"results_eval_{name}.json"
    atomic_write(path, json.dumps({**record, "metadata": metadata}, indent=2) + "\n")
    return path
