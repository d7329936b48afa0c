"""Loading released and local Franca backbones: hub entries, weights registry, key adapters, safe file reading."""

from franca.hub.backbones import (
    FRANCA_VIT_CONFIG,
    build_loaded_vit,
    franca_vitb14,
    franca_vitg14,
    franca_vitl14,
    load_backbone,
    load_rasa_head,
)
from franca.hub.keys import (
    ViTArchitecture,
    extract_rasa_state_dict,
    infer_architecture,
    infer_image_size,
    normalize_backbone_state_dict,
    to_release_state_dict,
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
    "FRANCA_VIT_CONFIG",
    "HUB_ENTRIES",
    "REGISTRY",
    "WEIGHTS_NAMES",
    "ReleaseAsset",
    "ReleasedWeights",
    "ViTArchitecture",
    "available_weights",
    "build_loaded_vit",
    "download_file",
    "extract_rasa_state_dict",
    "franca_vitb14",
    "franca_vitg14",
    "franca_vitl14",
    "get_weights",
    "infer_architecture",
    "infer_image_size",
    "load_backbone",
    "load_checkpoint_file",
    "load_multipart_checkpoint",
    "load_rasa_head",
    "normalize_backbone_state_dict",
    "read_export_config",
    "to_release_state_dict",
]
