"""Franca / DINOv2-compatible Vision Transformers."""

from franca.models.config import ARCHITECTURES, ViTConfig
from franca.models.vision_transformer import (
    DinoVisionTransformer,
    build_vit,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
    vit_tiny,
)

__all__ = [
    "ARCHITECTURES",
    "DinoVisionTransformer",
    "ViTConfig",
    "build_vit",
    "vit_base",
    "vit_giant2",
    "vit_large",
    "vit_small",
    "vit_tiny",
]
