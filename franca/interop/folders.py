"""Recognising and reading transformers and timm folders (:func:`franca.hub.load_backbone` calls
:func:`read_foreign_folder` for them).

A folder's ``config.json`` tells its library: ``model_type`` → transformers, ``architecture`` → timm; our own
safetensors export has neither (its ``config.json`` is a :class:`~franca.models.config.ViTConfig`). The library
builds its config (transformers: ``AutoConfig``, which fills the defaults a ``config.json`` leaves out; timm: the
model on the ``meta`` device, whose modules tell heads, norms and RoPE); the tensors are read by franca (safetensors,
sharded safetensors with an index, or ``pytorch_model.bin`` with ``weights_only=True``) and renamed to ours. A
``franca_config.json`` beside them (written by ``python -m franca.export.hf``) restores our exact configuration.
"""

import json
import os
from pathlib import Path

import torch

from franca.interop.extras import require
from franca.interop.renaming import ForeignFormatError, drop_fillers
from franca.interop.timm_format import describe, from_timm
from franca.interop.transformers_format import from_transformers
from franca.models.config import ViTConfig

CONFIG_FILE = "config.json"
FRANCA_CONFIG_FILE = "franca_config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
FORMATS = ("transformers", "timm")


def folder_format(path: str | os.PathLike) -> str | None:
    """``"transformers"``, ``"timm"`` or None (not a folder, or not one of theirs) from the folder's config.json."""
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    if "model_type" in config:
        return "transformers"
    if "architecture" in config:
        return "timm"
    return None


def _weight_files(folder: Path) -> list[Path]:
    if (folder / SAFETENSORS_FILE).is_file():
        return [folder / SAFETENSORS_FILE]
    if (folder / SAFETENSORS_INDEX).is_file():
        index = json.loads((folder / SAFETENSORS_INDEX).read_text())
        return [folder / name for name in sorted(set(index["weight_map"].values()))]
    if (folder / PICKLE_FILE).is_file():
        return [folder / PICKLE_FILE]
    raise FileNotFoundError(
        f"{folder} has a config.json but no {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} or {PICKLE_FILE}: copy the "
        "weights file into the folder"
    )


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's weight file(s), on CPU, read safely (no pickle code runs)."""
    from franca.hub.loading import load_checkpoint_file

    tensors: dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        raw = load_checkpoint_file(path)
        tensors.update({key: value for key, value in raw.items() if isinstance(value, torch.Tensor)})
    return tensors


def transformers_config_dict(folder: Path) -> dict:
    """The folder's full transformers config (defaults filled in by the library)."""
    transformers = require("transformers", f"reading the transformers folder {folder}")
    return transformers.AutoConfig.from_pretrained(str(folder)).to_dict()


def build_timm_model(folder: Path) -> torch.nn.Module:
    """The timm model of the folder's config, built on the ``meta`` device (no memory, no weights read)."""
    timm = require("timm", f"reading the timm folder {folder}")
    with torch.device("meta"):
        return timm.create_model(f"local-dir:{folder}", pretrained=False)


def read_foreign_folder(path: str | os.PathLike) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """(ViTConfig, our flat backbone state dict) of a transformers or timm folder."""
    folder = Path(path)
    fmt = folder_format(folder)
    source = f"the {fmt} folder {folder}"
    if fmt == "transformers":
        config, state = from_transformers(transformers_config_dict(folder), read_tensors(folder), source)
    elif fmt == "timm":
        config, state = from_timm(describe(build_timm_model(folder), source), read_tensors(folder), source)
    else:
        raise ForeignFormatError(
            f"{folder} is not a transformers or timm folder (its config.json has neither 'model_type' nor "
            "'architecture')"
        )
    stored = folder / FRANCA_CONFIG_FILE
    if stored.is_file():
        config = ViTConfig.from_dict(json.loads(stored.read_text()), source=str(stored))
        state = drop_fillers(state, config, source)
    return config, state
