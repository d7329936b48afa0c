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
from pathlib import Path

import torch

from franca.export.wrappers import add_model_arguments, load_export_model
from franca.models.vision_transformer import DinoVisionTransformer
from franca.utils.atomic import atomic_write

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
RASA_FILE = "rasa_head.safetensors"
RASA_PREFIX = "rasa_head."


def backbone_config(model: DinoVisionTransformer) -> dict:
    """Constructor keywords that rebuild ``model`` for inference (plus ``"arch"``); stochastic depth off."""
    return {**model.build_config(), "drop_path_rate": 0.0, "drop_path_uniform": True}


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        from safetensors.torch import save
    except ImportError as err:
        raise ImportError("safetensors export needs the 'safetensors' package: pip install safetensors") from err
    plain = {key: tensor.detach().cpu().contiguous().clone() for key, tensor in tensors.items()}
    atomic_write(path, save(plain, metadata={"format": "pt"}))


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
    atomic_write(out_dir / CONFIG_FILE, config)
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
