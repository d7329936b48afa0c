"""Export a backbone to ONNX and check it with onnxruntime against PyTorch.

``python -m franca.export.onnx --weights W [--rasa-weights R] [--image-size S | H W] [--dynamic-batch]
[--dynamic-size] [--opset N] --out model.onnx``

The image size defaults to the size the checkpoint was trained at; the graph's ``metadata_props`` carry
``franca.input_decoding`` (how to decode images for it: the checkpoint's, or ``--alpha-background`` /
``--image-max-value``) and ``franca.metadata`` (command, code, weights and their SHA-256, sizes;
:mod:`franca.export.options`).

The graph (see :mod:`franca.export.wrappers`) maps ``images [B, 3, H, W]`` to ``cls_token [B, D]``,
``patch_tokens [B, N, D]`` and, with a RASA head, ``patch_tokens_rasa [B, N, D]``. By default H, W (and B) are
fixed and the position embeddings are a constant; ``--dynamic-size`` accepts any H, W divisible by the patch size
and interpolates the position grid in the graph exactly like the model. Like the model (whose patch embedding raises
for such a size), a dynamic-size graph refuses an H or W that is not a multiple of the patch size at run time, where
the strided patch convolution would otherwise drop the last rows and columns silently: a check node on the input
fails, and the runtime's error names it "image height and width must be multiples of the patch size P ...".

After export the file is run with onnxruntime on random images and compared with ``forward_features``; the largest
absolute difference is printed and the command fails above ``--atol``; a dynamic-size graph must also refuse an
off-grid size.
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
    reference_outputs,
)
from franca.models.vision_transformer import DinoVisionTransformer

DEFAULT_ATOL = 1e-4
# torch.onnx's exporter implements opset 18 and newer; its down-conversion to 17 writes invalid Split nodes.
MIN_OPSET = 18
PATCH_GRID_CHECK = "image height and width must be multiples of the patch size {patch}; crop or resize the input"


def _require(package: str):
    try:
        return __import__(package)
    except ImportError as err:
        raise ImportError(
            f"ONNX export needs the '{package}' package: pip install onnx onnxruntime onnxscript (or franca[export])"
        ) from err


def _refuse_sizes_off_the_patch_grid(graph, patch_size: int) -> None:
    """Make the ``onnx_ir`` graph fail at run time when H or W of its input is not a multiple of ``patch_size``.

    ONNX has no assertion operator, so the check is a ``Reshape`` of a one-element zero tensor to the shape
    [1 + H mod P + W mod P]: it fails unless both remainders are 0, and the node's name is the error message. Its
    output (0.0) is added to the images, so the node is not pruned as unused and the values are unchanged.
    """
    import onnx_ir as ir

    images = graph.inputs[0]
    consumers = images.uses()
    tape = ir.tape.Tape()

    def constant(values: list, dtype) -> ir.Value:
        return tape.op("Constant", [], attributes={"value": ir.tensor(np.array(values, dtype=dtype))})

    spatial_size = tape.op("Shape", [images], attributes={"start": 2, "end": 4})
    remainders = tape.op("Mod", [spatial_size, constant([patch_size], np.int64)])
    length = tape.op("Add", [tape.op("ReduceSum", [remainders], attributes={"keepdims": 1}), constant([1], np.int64)])
    zero = tape.op("Reshape", [constant([0.0], np.float32), length], name=PATCH_GRID_CHECK.format(patch=patch_size))
    checked = tape.op("Add", [images, zero])
    graph.insert_before(graph[0], tape.nodes)
    for node, index in consumers:
        node.replace_input_with(index, checked)


def export_onnx(
    model: DinoVisionTransformer,
    out_path: str | os.PathLike,
    image_size: tuple[int, int],
    dynamic_batch: bool = False,
    dynamic_size: bool = False,
    opset: int | None = None,
    batch_size: int = 1,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a float32 ``model`` as ONNX to ``out_path`` (traced at ``image_size``; see the module docstring);
    ``metadata`` goes into the model's ``metadata_props``.

    Without ``dynamic_batch`` the graph's batch size is ``batch_size``; without ``dynamic_size`` its image size is
    ``image_size``; with it, an H or W that is not a multiple of the patch size is refused at run time (see the
    module docstring). Weights over 2 GB go to a ``<out>.data`` file next to it (ONNX external data).
    """
    _require("onnxscript")
    if opset is not None and opset < MIN_OPSET:
        raise ValueError(f"--opset {opset} is not supported: the torch.onnx exporter needs opset >= {MIN_OPSET}")
    height, width = check_image_size(image_size, model.patch_size)
    wrapper = exportable(model, None if dynamic_size else (height, width))
    names = output_names(model.rasa_head is not None)
    example_batch = max(batch_size, 2) if dynamic_batch else batch_size
    example = torch.randn(example_batch, 3, height, width, device=next(model.parameters()).device)
    dims = {}
    if dynamic_batch:
        dims[0] = torch.export.Dim("batch", min=1)
    if dynamic_size:
        dims[2] = torch.export.Dim("height_patches", min=1) * model.patch_size
        dims[3] = torch.export.Dim("width_patches", min=1) * model.patch_size
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=list(names),
            dynamic_shapes={INPUT_NAME: dims} if dims else None,
            opset_version=opset,
            verbose=False,
        )
    if dynamic_size:
        _refuse_sizes_off_the_patch_grid(program.model.graph, model.patch_size)
    program.model.metadata_props.update(metadata or {})
    program.save(str(out_path))
    return out_path


def verify_onnx(
    onnx_path: str | os.PathLike,
    model: DinoVisionTransformer,
    image_sizes: list[tuple[int, int]],
    batch_size: int = 1,
    seed: int = 0,
) -> dict[tuple[int, int], float]:
    """Largest |onnxruntime − PyTorch| over all outputs, for random images of each size (float32, CPU)."""
    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    generator = torch.Generator().manual_seed(seed)
    errors = {}
    for height, width in image_sizes:
        images = torch.randn(batch_size, 3, height, width, generator=generator)
        expected = reference_outputs(model, images, with_rasa=len(names) == 3)
        got = session.run(names, {INPUT_NAME: images.numpy()})
        errors[(height, width)] = max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected, strict=True))
    return errors


def refuses_off_grid_size(
    onnx_path: str | os.PathLike, image_size: tuple[int, int], patch_size: int, batch_size: int = 1
) -> bool:
    """Whether onnxruntime refuses, with the patch-grid message, images one pixel taller than ``image_size``."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the expected failure is reported here, not logged by the runtime
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    height, width = image_size
    images = np.zeros((batch_size, 3, height + 1, width), dtype=np.float32)
    try:
        session.run(None, {INPUT_NAME: images})
    except Exception as err:  # onnxruntime's error types derive from Exception only
        return PATCH_GRID_CHECK.format(patch=patch_size) in str(err)
    return False


def default_verify_sizes(
    model: DinoVisionTransformer, image_size: tuple[int, int], dynamic_size: bool
) -> list[tuple[int, int]]:
    """The export size; for a dynamic-size graph also the model's construction size and a non-square size."""
    if not dynamic_size:
        return [tuple(image_size)]
    patch = model.patch_size
    height, width = image_size
    sizes = [(height, width), (model.img_size, model.img_size), (height + patch, width + 2 * patch)]
    return list(dict.fromkeys(sizes))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m franca.export.onnx", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    add_export_arguments(parser)
    parser.add_argument("--dynamic-batch", action="store_true", help="accept any batch size")
    parser.add_argument("--dynamic-size", action="store_true", help="accept any H, W divisible by the patch size")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size of a fixed-batch graph (default 1)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="largest accepted |ONNX − PyTorch|")
    parser.add_argument("--out", required=True, help="output .onnx file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_export_args(parser, argv)
    try:
        model = load_export_model(args.weights, args.rasa_weights, args.arch).float()
        settings = export_settings(args, model)
        image_size = check_image_size(settings.image_size, model.patch_size)
        path = export_onnx(
            model, args.out, image_size, args.dynamic_batch, args.dynamic_size, args.opset, args.batch_size,
            export_metadata(args, settings),
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(f"wrote {path} (outputs: {', '.join(output_names(model.rasa_head is not None))})")
    errors = verify_onnx(path, model, default_verify_sizes(model, image_size, args.dynamic_size), args.batch_size)
    for (height, width), error in errors.items():
        print(f"onnxruntime vs PyTorch at {height}x{width}: max abs error {error:.3e}")
    worst = max(errors.values())
    if worst > args.atol:
        print(f"error: max abs error {worst:.3e} exceeds --atol {args.atol:g}", file=sys.stderr)
        return 1
    if args.dynamic_size and not refuses_off_grid_size(path, image_size, model.patch_size, args.batch_size):
        print(f"error: {path} accepts an image size that is not a multiple of {model.patch_size}", file=sys.stderr)
        return 1
    if args.dynamic_size:
        print(f"refuses {image_size[0] + 1}x{image_size[1]}: not a multiple of the patch size {model.patch_size}")
    print(f"verified: max abs error {worst:.3e} <= {args.atol:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
