"""Export a backbone as a safetensors folder that :func:`franca.hub.load_backbone` reads back.

``python -m franca.export.safetensors --weights W [--rasa-weights R] --out DIR``

The folder holds:

* ``config.json``: the ``DinoVisionTransformer`` constructor keywords of the model (read off the built model by
  :func:`backbone_config`) and ``"arch"``: the name in ``ARCHITECTURES`` whose (embed_dim, depth, num_heads) the model
  has, or ``null`` for any other shape;
* ``model.safetensors``: the backbone's state dict with our flat keys (``blocks.{i}.…``), tensors as they are (same
  dtype, bit for bit), no ``rasa_head.*`` keys;
* ``rasa_head.safetensors`` (only with a RASA head): the head's original keys ``pre_pos_layers.{j}.weight`` [2, D]
  and ``pos_pred.weight`` [2, D] (reference §8.1).

Unlike a ``.pth`` pickle, safetensors files cannot run code when read, and they load lazily (memory-mapped).
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from franca.export.wrappers import add_model_arguments, load_export_model
from franca.layers import LayerScale, Mlp, SwiGLUFFN, swiglu_hidden_dim
from franca.models.vision_transformer import ARCHITECTURES, DinoVisionTransformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
RASA_FILE = "rasa_head.safetensors"
RASA_PREFIX = "rasa_head."


def _ffn_config(embed_dim: int, ffn: torch.nn.Module) -> dict:
    """``ffn_layer``, ``mlp_ratio`` and ``ffn_bias`` that rebuild ``ffn``.

    The ratio is fc1's width / D for an MLP; for SwiGLU it is the 4·D-style budget the packed width was sized from
    (``swiglu_hidden_dim``), found among the candidates that rebuild the same width.
    """
    if isinstance(ffn, Mlp):
        layer, first, hidden = "mlp", ffn.fc1, ffn.fc1.out_features

        def rebuild(ratio: float) -> int:
            return int(embed_dim * ratio)

    elif isinstance(ffn, SwiGLUFFN):
        layer, first, hidden = "swiglufused", ffn.w12, ffn.w3.in_features

        def rebuild(ratio: float) -> int:
            return swiglu_hidden_dim(int(embed_dim * ratio))

    else:
        raise TypeError(
            f"cannot describe a feed-forward layer of type {type(ffn).__name__} (expected Mlp or SwiGLUFFN)"
        )
    ratio = next((r for r in (4.0, hidden / embed_dim, hidden * 1.5 / embed_dim) if rebuild(r) == hidden), None)
    if ratio is None:
        raise ValueError(f"no mlp_ratio rebuilds a {layer} layer of hidden width {hidden} for embed_dim {embed_dim}")
    return {"ffn_layer": layer, "mlp_ratio": ratio, "ffn_bias": first.bias is not None}


def backbone_config(model: DinoVisionTransformer) -> dict:
    """Constructor keywords that rebuild ``model`` for inference (plus ``"arch"``), read off its modules.

    Stochastic depth is a training setting and is written as off (``drop_path_rate`` 0).
    """
    block = model.blocks[0]
    dims = (model.embed_dim, len(model.blocks), model.num_heads)
    arch = next((name for name, spec in ARCHITECTURES.items() if tuple(spec) == dims), None)
    return {
        "arch": arch,
        "img_size": model.img_size,
        "patch_size": model.patch_size,
        "in_chans": model.patch_embed.proj.in_channels,
        "embed_dim": model.embed_dim,
        "depth": len(model.blocks),
        "num_heads": model.num_heads,
        **_ffn_config(model.embed_dim, block.mlp),
        "qkv_bias": block.attn.qkv.bias is not None,
        "proj_bias": block.attn.proj.bias is not None,
        "layerscale": block.ls1.init_values if isinstance(block.ls1, LayerScale) else None,
        "drop_path_rate": 0.0,
        "drop_path_uniform": True,
        "num_register_tokens": model.num_register_tokens,
        "interpolate_offset": float(model.interpolate_offset),
        "interpolate_antialias": bool(model.interpolate_antialias),
    }


def _write_atomically(path: Path, write) -> None:
    """Run ``write(temp_path)`` then rename the temporary file onto ``path`` (no half-written file on a crash)."""
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError as err:
        raise ImportError("safetensors export needs the 'safetensors' package: pip install safetensors") from err
    plain = {key: tensor.detach().cpu().contiguous().clone() for key, tensor in tensors.items()}
    _write_atomically(path, lambda temp: save_file(plain, temp, metadata={"format": "pt"}))


def export_safetensors(model: DinoVisionTransformer, out_dir: str | os.PathLike) -> Path:
    """Write ``config.json``, ``model.safetensors`` and, with a RASA head, ``rasa_head.safetensors`` into ``out_dir``.

    A ``rasa_head.safetensors`` left in ``out_dir`` by an earlier export is removed when ``model`` has no RASA head,
    so the folder always describes one model.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file; the safetensors export is a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    backbone = {key: tensor for key, tensor in state.items() if not key.startswith(RASA_PREFIX)}
    config = json.dumps(backbone_config(model), indent=2) + "\n"
    _write_atomically(out_dir / CONFIG_FILE, lambda temp: Path(temp).write_text(config))
    _save_tensors(backbone, out_dir / WEIGHTS_FILE)
    rasa = {key[len(RASA_PREFIX) :]: tensor for key, tensor in state.items() if key.startswith(RASA_PREFIX)}
    if rasa:
        _save_tensors(rasa, out_dir / RASA_FILE)
    else:
        (out_dir / RASA_FILE).unlink(missing_ok=True)
    return out_dir


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
