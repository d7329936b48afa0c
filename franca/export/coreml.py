"""Export a backbone to a Core ML ``.mlpackage`` (ML program) through ``torch.export``.

``python -m franca.export.coreml --weights W [--rasa-weights R] [--image-size S | H W] --out model.mlpackage
[--fp16]``

The image size defaults to the size the checkpoint was trained at; ``user_defined_metadata`` carries
``franca.input_decoding`` and ``franca.metadata`` (:mod:`franca.export.options`).

The graph is :class:`franca.export.wrappers.ExportableBackbone` at one fixed image size (position embeddings baked
as a constant; a distilled timm student goes through ``ExportableFeatures``): input ``images [B, 3, H, W]``
(float32), outputs ``cls_token [B, D]``, ``patch_tokens [B, N, D]`` and, with a RASA head,
``patch_tokens_rasa [B, N, D]``. ``--fp16`` computes in float16; inputs and outputs stay float32 either way, so
callers feed and read the same arrays. Core ML runs predictions on macOS/iOS only; on Linux the package is written
and can be inspected, not run.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from franca.export.options import add_export_arguments, export_metadata, export_settings, parse_export_args
from franca.export.wrappers import (
    INPUT_NAME,
    add_model_arguments,
    check_image_size,
    exportable,
    load_export_model,
    output_names,
)
from franca.models.vision_transformer import DinoVisionTransformer

DEPLOYMENT_TARGETS = ("iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15")
DEFAULT_TARGET = "iOS17"


def _coremltools():
    try:
        import coremltools
    except ImportError as err:
        raise ImportError("Core ML export needs the 'coremltools' package: pip install coremltools") from err
    return coremltools


def export_coreml(
    model: DinoVisionTransformer,
    out_path: str | os.PathLike,
    image_size: tuple[int, int],
    fp16: bool = False,
    batch_size: int = 1,
    target: str = DEFAULT_TARGET,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Convert a float32 ``model`` at a fixed (batch, image size) and save it as an ``.mlpackage`` at ``out_path``;
    ``metadata`` goes into its ``user_defined_metadata``."""
    ct = _coremltools()
    if target not in DEPLOYMENT_TARGETS:
        raise ValueError(f"deployment target {target!r} is not supported; choose one of {list(DEPLOYMENT_TARGETS)}")
    out_path = Path(out_path)
    if out_path.suffix != ".mlpackage":
        raise ValueError(f"a Core ML ML program is saved as a .mlpackage folder; got --out {out_path}")
    height, width = check_image_size(image_size, model.patch_size)
    wrapper = exportable(model, (height, width))
    example = torch.randn(batch_size, 3, height, width)
    with torch.no_grad():
        program = torch.export.export(wrapper, (example,)).run_decompositions({})
    names = output_names(model.rasa_head is not None)
    mlmodel = ct.convert(
        program,
        inputs=[ct.TensorType(name=INPUT_NAME, shape=tuple(example.shape), dtype=np.float32)],
        outputs=[ct.TensorType(name=name, dtype=np.float32) for name in names],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32,
        minimum_deployment_target=getattr(ct.target, target),
    )
    mlmodel.short_description = (
        f"Franca/DINOv2 ViT backbone (patch {model.patch_size}, dim {model.embed_dim}) at {height}x{width}: "
        f"{', '.join(names)}"
    )
    mlmodel.user_defined_metadata.update(metadata or {})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    mlmodel.save(str(out_path))
    return out_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m franca.export.coreml", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    add_export_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--fp16", action="store_true", help="compute in float16 (Core ML's usual precision)")
    parser.add_argument("--target", choices=DEPLOYMENT_TARGETS, default=DEFAULT_TARGET, help="minimum deployment")
    parser.add_argument("--out", required=True, help="output .mlpackage")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_export_args(parser, argv)
    try:
        model = load_export_model(args.weights, args.rasa_weights, args.arch).float()
        settings = export_settings(args, model)
        path = export_coreml(
            model, args.out, settings.image_size, args.fp16, args.batch_size, args.target,
            export_metadata(args, settings),
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(f"wrote {path} (outputs: {', '.join(output_names(model.rasa_head is not None))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
