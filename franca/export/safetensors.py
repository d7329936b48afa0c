"""Export a backbone as a safetensors folder that :func:`franca.hub.load_backbone` reads back.

``python -m franca.export.safetensors --weights W [--rasa-weights R] [--alpha-background C] [--image-max-value M]
--out DIR``

``config.json`` records the model's ``input_decoding`` (the checkpoint's, or the flags'); the header of
``model.safetensors`` carries ``franca.input_decoding`` and ``franca.metadata`` (:mod:`franca.export.options`).

The folder's layout is described in :mod:`franca.models.safetensors_folder`, which writes it (the training
checkpoint consolidation writes the same folder).

Unlike a ``.pth`` pickle, safetensors files cannot run code when read, and they load lazily (memory-mapped).
"""

import argparse
import sys

from franca.export.options import add_export_arguments, export_metadata, export_settings, parse_export_args
from franca.export.wrappers import add_model_arguments, load_export_model
from franca.models.safetensors_folder import backbone_config, export_safetensors

__all__ = ["backbone_config", "build_parser", "export_safetensors", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m franca.export.safetensors", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    add_export_arguments(parser, image_size=False)
    parser.add_argument("--out", required=True, help="output folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_export_args(parser, argv)
    try:
        model = load_export_model(args.weights, args.rasa_weights, args.arch)
        settings = export_settings(args, model)
        out_dir = export_safetensors(model, args.out, export_metadata(args, settings))
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        parser.error(str(err))
    files = sorted(path.name for path in out_dir.iterdir() if not path.name.startswith("."))
    print(f"wrote {out_dir}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
