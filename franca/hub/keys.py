"""Key adapters between checkpoint files and our ViT (reference §2.6).

Released files hold the teacher under ``"teacher"`` with ``backbone.`` (sometimes ``module.``) prefixes, chunked block
keys ``blocks.{c}.{i}.`` and, in training exports, ``dino_head.*`` / ``ibot_head.*`` / ``rasa_head.*`` tensors. Our
ViT uses flat ``blocks.{i}.`` keys. These functions convert between the two and read the architecture off the keys.
"""

import math
import re
from dataclasses import asdict, dataclass

import torch

from franca.layers import swiglu_hidden_dim
from franca.models.vision_transformer import ARCHITECTURES

WRAPPER_KEYS = ("teacher", "model", "state_dict")
STRIPPED_PREFIXES = ("module.", "backbone.")
TRAINING_HEAD_PREFIXES = ("dino_head.", "ibot_head.")
RASA_PREFIX = "rasa_head."
RASA_KEY_STARTS = ("pre_pos_layers.", "pos_pred.")
_CHUNKED_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.")
_FLAT_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def unwrap_state_dict(raw: dict) -> dict:
    """The tensor dict inside a checkpoint file: descends through ``teacher`` / ``model`` / ``state_dict`` wrappers."""
    if not isinstance(raw, dict):
        raise TypeError(f"a checkpoint must hold a dict of tensors, got {type(raw).__name__}")
    while not _is_tensor_dict(raw):
        wrapper = next((key for key in WRAPPER_KEYS if isinstance(raw.get(key), dict)), None)
        if wrapper is None:
            raise ValueError(
                f"checkpoint is neither a dict of tensors nor wrapped under one of {list(WRAPPER_KEYS)}; "
                f"its top-level keys are {sorted(map(str, raw))[:10]}"
            )
        raw = raw[wrapper]
    return raw


def _is_tensor_dict(value: dict) -> bool:
    return bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _strip_prefixes(key: str, prefixes: tuple[str, ...]) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def normalize_backbone_state_dict(raw: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a checkpoint into (backbone state dict with flat keys, RASA head state dict).

    Unwraps ``teacher``/``model``, strips leading ``module.``/``backbone.``, drops ``dino_head.``/``ibot_head.``
    tensors, moves ``rasa_head.*`` into the second dict (prefix removed), and remaps ``blocks.{c}.{i}.`` to
    ``blocks.{i}.`` (the chunk index c is redundant: i is the global block index).
    """
    backbone: dict[str, torch.Tensor] = {}
    rasa: dict[str, torch.Tensor] = {}
    for key, tensor in unwrap_state_dict(raw).items():
        key = _strip_prefixes(key, STRIPPED_PREFIXES)
        if key.startswith(TRAINING_HEAD_PREFIXES):
            continue
        if key.startswith(RASA_PREFIX):
            rasa[key[len(RASA_PREFIX) :]] = tensor
            continue
        key = _CHUNKED_BLOCK.sub(r"blocks.\2.", key)
        if key in backbone:
            raise ValueError(f"checkpoint has two tensors for backbone key {key!r} (after removing prefixes/chunks)")
        backbone[key] = tensor
    if not backbone:
        raise ValueError("checkpoint holds no backbone tensors (only training heads or RASA keys)")
    return backbone, rasa


def extract_rasa_state_dict(raw: dict) -> dict[str, torch.Tensor]:
    """The RASA head tensors (``pre_pos_layers.{j}.weight``, ``pos_pred.weight``) of a RASA file or a checkpoint."""
    state = {}
    for key, tensor in unwrap_state_dict(raw).items():
        key = _strip_prefixes(key, (*STRIPPED_PREFIXES, RASA_PREFIX))
        if key.startswith(RASA_KEY_STARTS):
            state[key] = tensor
    if "pos_pred.weight" not in state:
        keys = sorted(unwrap_state_dict(raw))[:8]
        raise ValueError(f"not a RASA head file: no 'pos_pred.weight' (or 'rasa_head.pos_pred.weight'); keys: {keys}")
    return state


def infer_image_size(state_dict: dict[str, torch.Tensor], patch_size: int) -> int:
    """Construction image size from ``pos_embed`` [1, 1+M², D]: M = √(rows−1), image = patch_size·M (§2.6)."""
    if "pos_embed" not in state_dict:
        raise KeyError("state dict has no 'pos_embed'; normalise it with normalize_backbone_state_dict first")
    rows = state_dict["pos_embed"].shape[1] - 1
    side = math.isqrt(rows)
    if side * side != rows:
        raise ValueError(f"pos_embed has {rows} patch rows, which is not a square grid M×M")
    return side * patch_size


def to_release_state_dict(
    model_state_dict: dict[str, torch.Tensor], block_chunks: int = 4, prefix: str = "backbone."
) -> dict[str, torch.Tensor]:
    """Our flat keys → the released naming: ``prefix`` + ``blocks.{c}.{i}.`` with c = i // (depth // block_chunks).

    ``block_chunks=0`` keeps flat block keys. RASA tensors are left out: releases ship the head as its own file.
    """
    depth = 1 + max((int(m.group(1)) for k in model_state_dict if (m := _FLAT_BLOCK.match(k))), default=-1)
    if block_chunks < 0 or (block_chunks and depth < block_chunks):
        raise ValueError(f"block_chunks={block_chunks} must be 0 (flat) or between 1 and the depth {depth}")
    chunk_size = depth // block_chunks if block_chunks else 0
    release = {}
    for key, tensor in model_state_dict.items():
        if key.startswith(RASA_PREFIX):
            continue
        if _CHUNKED_BLOCK.match(key):
            raise ValueError(f"key {key!r} is already chunked; pass our model's flat state dict")
        if chunk_size:
            key = _FLAT_BLOCK.sub(lambda m: f"blocks.{int(m.group(1)) // chunk_size}.{m.group(1)}.", key)
        release[prefix + key] = tensor
    return release


@dataclass(frozen=True)
class ViTArchitecture:
    """Constructor arguments of :class:`DinoVisionTransformer` read off a state dict (heads: from the known archs)."""

    arch: str | None
    img_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    ffn_layer: str
    qkv_bias: bool
    proj_bias: bool
    ffn_bias: bool
    layerscale: float | None
    num_register_tokens: int

    def model_kwargs(self) -> dict:
        kwargs = asdict(self)
        kwargs.pop("arch")
        return kwargs


def _guess_heads(embed_dim: int, depth: int) -> tuple[str | None, int]:
    for name, (dim, arch_depth, heads) in ARCHITECTURES.items():
        if (dim, arch_depth) == (embed_dim, depth):
            return name, heads
    for dim, _, heads in ARCHITECTURES.values():
        if dim == embed_dim:
            return None, heads
    if embed_dim % 64:
        raise ValueError(f"cannot guess num_heads for embed_dim={embed_dim}; pass num_heads= explicitly")
    return None, embed_dim // 64


def _swiglu_mlp_ratio(embed_dim: int, hidden: int) -> float:
    """An mlp_ratio whose SwiGLU width rounds to ``hidden`` (4.0 for every Franca model)."""
    if swiglu_hidden_dim(4 * embed_dim) == hidden:
        return 4.0
    for budget in range(hidden * 3 // 2 - 12, hidden * 3 // 2 + 13):
        ratio = budget / embed_dim
        if budget > 0 and int(embed_dim * ratio) == budget and swiglu_hidden_dim(budget) == hidden:
            return ratio
    raise ValueError(f"SwiGLU hidden width {hidden} cannot be built by our SwiGLUFFN (it must be a multiple of 8)")


def infer_architecture(state_dict: dict[str, torch.Tensor]) -> ViTArchitecture:
    """Read a ViT's architecture off a normalised (flat-key) backbone state dict."""
    required = ("pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight")
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(f"not a ViT backbone state dict: missing {missing} (keys start with {sorted(state_dict)[:6]})")
    embed_dim, in_chans, patch_size, _ = state_dict["patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for key in state_dict if (m := _FLAT_BLOCK.match(key)))
    arch, num_heads = _guess_heads(embed_dim, depth)
    if "blocks.0.mlp.w12.weight" in state_dict:
        ffn_layer, ffn_bias_key = "swiglufused", "blocks.0.mlp.w12.bias"
        mlp_ratio = _swiglu_mlp_ratio(embed_dim, state_dict["blocks.0.mlp.w3.weight"].shape[1])
    elif "blocks.0.mlp.fc1.weight" in state_dict:
        ffn_layer, ffn_bias_key = "mlp", "blocks.0.mlp.fc1.bias"
        mlp_ratio = state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    else:
        raise ValueError("unknown feed-forward layer: neither 'blocks.0.mlp.w12.weight' nor 'blocks.0.mlp.fc1.weight'")
    registers = state_dict.get("register_tokens")
    return ViTArchitecture(
        arch=arch,
        img_size=infer_image_size(state_dict, patch_size),
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        ffn_layer=ffn_layer,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        proj_bias="blocks.0.attn.proj.bias" in state_dict,
        ffn_bias=ffn_bias_key in state_dict,
        layerscale=1e-5 if "blocks.0.ls1.gamma" in state_dict else None,
        num_register_tokens=0 if registers is None else registers.shape[1],
    )
