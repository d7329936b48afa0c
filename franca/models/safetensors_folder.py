"""The safetensors folder of a backbone, written by ``python -m franca.export.safetensors`` and by
``python -m franca.checkpoint.consolidate``; read back by :func:`franca.hub.load_backbone`. It lives with the models
(not in ``franca.export``) so that the checkpoint layer can write it too (docs/architecture.md).

The folder holds:

* ``config.json``: the model's :class:`~franca.models.config.ViTConfig` as :meth:`~ViTConfig.to_dict` writes it
  (stochastic depth off; read back with ``ViTConfig.from_dict``): every field and ``"arch"``, the name in
  ``ARCHITECTURES`` whose (embed_dim, depth, num_heads) the model has, or ``null`` for any other shape; and the
  model's ``input_decoding`` when it has one (:func:`franca.models.config.stored_input_decoding`);
* ``model.safetensors``: the backbone's state dict with our flat keys (``blocks.{i}.…``), tensors as they are (same
  dtype, bit for bit), no ``rasa_head.*`` keys;
* ``rasa_head.safetensors`` (only with a RASA head): the head's original keys ``pre_pos_layers.{j}.weight`` [2, D]
  and ``pos_pred.weight`` [2, D] (valeoai/Franca ``rasa/src/rasa_head.py``, ``RASAHead``).
"""

import json
import os
from pathlib import Path

import torch

from franca.models.vision_transformer import DinoVisionTransformer
from franca.models.weights import RASA_PREFIX, split_prefix
from franca.utils.atomic import atomic_write

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
RASA_FILE = "rasa_head.safetensors"


def backbone_config(model: DinoVisionTransformer) -> dict:
    """The stored config that rebuilds ``model`` for inference (``ViTConfig.to_dict``, stochastic depth off)."""
    return model.build_config()


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on CPU, contiguous and alone in its storage (safetensors refuses tensors that share one); a tensor
    that already is (a parameter) is not copied, which keeps the memory of a large export at one model."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to a ``.safetensors`` file atomically (views, e.g. rows of a fused matrix, are copied;
    ``metadata`` strings in the header beside ``format: pt``, which transformers requires)."""
    try:
        from safetensors.torch import save
    except ImportError as err:
        raise ImportError("safetensors export needs the 'safetensors' package: pip install safetensors") from err
    plain = {key: _own_storage(tensor) for key, tensor in tensors.items()}
    atomic_write(path, save(plain, metadata={**(metadata or {}), "format": "pt"}))


def export_safetensors(
    model: DinoVisionTransformer, out_dir: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and, with a RASA head, ``rasa_head.safetensors`` into ``out_dir``;
    ``metadata`` (strings) goes into the header of ``model.safetensors``.

    A ``rasa_head.safetensors`` left in ``out_dir`` by an earlier export is removed when ``model`` has no RASA head,
    so the folder always describes one model.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file; the safetensors export is a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    rasa, backbone = split_prefix(state, RASA_PREFIX)
    config = json.dumps(backbone_config(model), indent=2) + "\n"
    atomic_write(out_dir / CONFIG_FILE, config)
    save_tensors(backbone, out_dir / WEIGHTS_FILE, metadata)
    if rasa:
        save_tensors(rasa, out_dir / RASA_FILE)
    else:
        (out_dir / RASA_FILE).unlink(missing_ok=True)
    return out_dir
