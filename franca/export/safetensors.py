"""Export a backbone as a safetensors folder that :func:`franca.hub.load_backbone` reads back.

``python -m franca.export.safetensors --weights W [--rasa-weights R] --out DIR``

The folder's layout is described in :mod:`franca.models.safetensors_folder`, which writes it (the training
checkpoint consolidation writes the same folder).

Unlike a ``.pth`` pickle, safetensors files cannot run code when read, and they load lazily (memory-mapped).
"""

import argparse
import sys

from franca.export.wrappers import add_model_arguments, load_export_model
from franca.models.safetensors_folder import backbone_config, export_safetensors

__all__ = ["backbone_config", "build_parser", "export_safetensors", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m franca.export.safetensors", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        model = load_export_model(args.weights, args.rasa_weights, args.arch)
        out_dir = export_safetensors(model, args.out)
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        parser.error(str(err))
    files = sorted(path.name for path in out_dir.iterdir() if not path.name.startswith("."))
    print(f"wrote {out_dir}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
