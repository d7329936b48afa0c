"""The evaluation commands' surface for the export commands (docs/export.md): the image size defaults to the size
the checkpoint was trained at, the image decoding to the one it records (flags override both), a ``sizes:`` line
says which were used, and the export carries a ``metadata`` block like a results file (command, code, weights,
sizes, decoding) beside its ``input_decoding``, so that whoever deploys it decodes images as the model saw them."""

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass

from torch import nn

from franca.data.image_decoding import ImageDecoding
from franca.eval.lib.common import add_decoding_arguments, add_image_size_argument, resolve_decoding, resolve_image_size
from franca.eval.lib.provenance import results_metadata

METADATA_KEY = "franca.metadata"
DECODING_KEY = "franca.input_decoding"


def add_export_arguments(parser: argparse.ArgumentParser, image_size: bool = True) -> None:
    """``--image-size S | H W`` (default: the checkpoint's ``img_size``) and the decoding flags."""
    if image_size:
        add_image_size_argument(parser)
    add_decoding_arguments(parser)


@dataclass(frozen=True)
class ExportSettings:
    """What an export is made for: the image size (None for size-free exports) and the decoding, with sources."""

    image_size: tuple[int, int] | None
    size_source: str
    decoding: ImageDecoding
    decoding_source: str

    def describe(self) -> str:
        size = f"image {self.image_size[0]}x{self.image_size[1]} ({self.size_source}); " if self.image_size else ""
        return f"sizes: {size}decoding {self.decoding.describe()} ({self.decoding_source})"


def export_settings(args: argparse.Namespace, model: nn.Module) -> ExportSettings:
    """The settings of a parsed export command line for ``model``; the ``sizes:`` line is printed. A decoding the
    checkpoint records or the flags give becomes the model's (so that folder exports store it); without either the
    model keeps none, and the graph exports record the default as such."""
    size, size_source = (None, "")
    if hasattr(args, "image_size"):
        size, size_source = resolve_image_size(args.image_size, None, None, model)
    decoding, decoding_source = resolve_decoding(args, model)
    if model.input_decoding is not None or args.alpha_background is not None or args.image_max_value is not None:
        model.input_decoding = decoding.to_record()
    settings = ExportSettings(size, size_source, decoding, decoding_source)
    print(settings.describe(), flush=True)
    return settings


def export_metadata(args: argparse.Namespace, settings: ExportSettings) -> dict[str, str]:
    """String entries for the export's own metadata (ONNX ``metadata_props``, Core ML ``user_defined_metadata``,
    the safetensors header): the decoding, and the metadata block of :func:`franca.eval.lib.provenance.results_metadata`
    as JSON."""
    sizes = {} if settings.image_size is None else {"image_size": list(settings.image_size)}
    sizes.update({"image_size_from": settings.size_source} if settings.image_size else {})
    decoding = {**settings.decoding.to_record(), "from": settings.decoding_source}
    block = results_metadata(args.command, args.weights, args.rasa_weights, {}, sizes, None, args.started, decoding)
    return {DECODING_KEY: json.dumps(settings.decoding.to_record()), METADATA_KEY: json.dumps(block)}


def parse_export_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parsed flags, with the command line as typed (``command``) and the start time (``started``)."""
    args = parser.parse_args(argv)
    module = parser.prog.removeprefix("python -m ")
    args.command = shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])
    args.started = time.perf_counter()
    return args
