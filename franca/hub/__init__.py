"""Loading released and local Franca backbones: hub entries, weights registry, safe file reading (key adapters:
:mod:`franca.models.weights`)."""

from franca.hub.backbones import (
    build_loaded_vit,
    franca_from_checkpoint,
    franca_vitb14,
    franca_vitg14,
    franca_vitl14,
    load_backbone,
    load_backbone_and_heads,
    load_rasa_head,
)
from franca.hub.loading import download_file, load_checkpoint_file, load_multipart_checkpoint, read_export_config
from franca.hub.registry import (
    DEFAULT_WEIGHTS,
    HUB_ENTRIES,
    REGISTRY,
    WEIGHTS_NAMES,
    ReleaseAsset,
    ReleasedWeights,
    available_weights,
    get_weights,
)

__all__ = [
    "DEFAULT_WEIGHTS",
    "HUB_ENTRIES",
    "REGISTRY",
    "WEIGHTS_NAMES",
    "ReleaseAsset",
    "ReleasedWeights",
    "available_weights",
    "build_loaded_vit",
    "download_file",
    "franca_from_checkpoint",
    "franca_vitb14",
    "franca_vitg14",
    "franca_vitl14",
    "get_weights",
    "load_backbone",
    "load_backbone_and_heads",
    "load_checkpoint_file",
    "load_multipart_checkpoint",
    "load_rasa_head",
    "read_export_config",
]
