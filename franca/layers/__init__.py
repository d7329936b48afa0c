"""Building blocks of the Franca ViT and its heads."""

from franca.layers.attention import Attention
from franca.layers.block import Block
from franca.layers.drop_path import DropPath
from franca.layers.layer_scale import LayerScale
from franca.layers.mlp import Mlp
from franca.layers.patch_embed import PatchEmbed
from franca.layers.rope import RotaryPositions
from franca.layers.swiglu_ffn import SwiGLUFFN, swiglu_hidden_dim

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "RotaryPositions",
    "SwiGLUFFN",
    "swiglu_hidden_dim",
]
