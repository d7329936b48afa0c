"""The one adapter between checkpoint files and :class:`DinoVisionTransformer` weights (docs/export.md).

Files come in several layouts: released teachers ``{"teacher": {"backbone.blocks.{c}.{i}.…", "dino_head.…"}}``
(chunked block keys, as the original's FSDP wrapping wrote them: valeoai/Franca ``franca/models/vision_transformer.py``,
``BlockChunk``), ``module.`` / ``_orig_mod.`` prefixes of DDP and ``torch.compile``, our training checkpoints
``{"model": {"student.…", "teacher.backbone.…"}, "optimizer": …}``, safetensors exports with flat keys. Our ViT uses
flat ``blocks.{i}.`` keys at one position grid.

* :func:`from_release`: any of those → (flat backbone state dict, RASA head tensors), position grid optionally
  resized for a target :class:`ViTConfig` with the model's own run-time interpolation;
* :func:`to_release`: flat keys → the released chunked naming;
* :func:`infer_config`: the :class:`ViTConfig` a flat state dict was built with;
* :func:`load_strict`: the one strict load, whose :class:`WeightsMismatchError` lists missing, unexpected and
  mis-shaped keys and names the source.
"""

import math
import re

import torch
from torch import nn

from franca.layers import swiglu_hidden_dim
from franca.models.config import ARCHITECTURES, ViTConfig
from franca.models.vision_transformer import resize_pos_embed

WRAPPER_KEYS = ("teacher", "model", "state_dict")
TEACHER_PREFIX = "teacher."
STRIPPED_PREFIXES = ("module.", "_orig_mod.", "backbone.")
TRAINING_HEAD_PREFIXES = ("dino_head.", "ibot_head.")
RASA_PREFIX = "rasa_head."
RASA_KEY_STARTS = ("pre_pos_layers.", "pos_pred.")
_CHUNKED_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.")
_FLAT_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_LISTED = 6


class WeightsMismatchError(ValueError):
    """Weights whose keys or shapes do not fit the model they are loaded into."""


# ---------------------------------------------------------------------------------------------------------------------
# Reading checkpoints


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


def split_prefix(state: dict, prefix: str) -> tuple[dict, dict]:
    """(the entries of ``state`` under ``prefix``, with it removed; the others, as they are): franca's one way of
    taking a sub-state out of a state dict (``teacher.``, ``backbone.``, ``rasa_head.``, a DCP ``model.``)."""
    inside, outside = {}, {}
    for key, value in state.items():
        if key.startswith(prefix):
            inside[key[len(prefix) :]] = value
        else:
            outside[key] = value
    return inside, outside


def _teacher_part(state: dict) -> dict:
    """A training checkpoint's model state holds ``student.*`` and ``teacher.*``: keep the teacher (the evaluated
    network; paper arXiv 2507.14137); any other state dict is returned as it is."""
    teacher, _ = split_prefix(state, TEACHER_PREFIX)
    return teacher or state


def strip_prefixes(key: str, prefixes: tuple[str, ...] = STRIPPED_PREFIXES) -> str:
    """``key`` without any leading run of ``prefixes`` (in any order, e.g. ``module.backbone._orig_mod.``)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def flatten_block_key(key: str) -> str:
    """``blocks.{c}.{i}.…`` → ``blocks.{i}.…`` (the chunk index c is redundant: i is the global block index)."""
    return _CHUNKED_BLOCK.sub(r"blocks.\2.", key)


def from_release(raw: dict, config: ViTConfig | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split any checkpoint layout into (backbone state dict with our flat keys, RASA head state dict).

    Unwraps ``teacher``/``model``/``state_dict``, keeps the teacher of a training checkpoint, strips leading
    ``module.``/``_orig_mod.``/``backbone.``, drops ``dino_head.``/``ibot_head.`` tensors, moves ``rasa_head.*`` into
    the second dict (prefix removed) and flattens chunked block keys. With ``config``, a position grid of another
    size is resized for ``config.img_size`` (:func:`fit_position_grid`).
    """
    backbone: dict[str, torch.Tensor] = {}
    rasa: dict[str, torch.Tensor] = {}
    for key, tensor in _teacher_part(unwrap_state_dict(raw)).items():
        key = strip_prefixes(key)
        if key.startswith(TRAINING_HEAD_PREFIXES):
            continue
        if key.startswith(RASA_PREFIX):
            rasa[key[len(RASA_PREFIX) :]] = tensor
            continue
        key = flatten_block_key(key)
        if key in backbone:
            raise ValueError(f"checkpoint has two tensors for backbone key {key!r} (after removing prefixes/chunks)")
        backbone[key] = tensor
    if not backbone:
        raise ValueError("checkpoint holds no backbone tensors (only training heads or RASA keys)")
    if config is not None:
        backbone = fit_position_grid(backbone, config)
    return backbone, rasa


def extract_training_heads(raw: dict) -> dict[str, dict[str, torch.Tensor]]:
    """The DINO / iBOT heads a checkpoint carries (a training checkpoint's teacher heads, or a teacher export's):
    ``{"dino_head": state dict, "ibot_head": state dict}``, only those present (released backbones carry none)."""
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in _teacher_part(unwrap_state_dict(raw)).items():
        key = strip_prefixes(key, ("module.", "_orig_mod."))
        for prefix in TRAINING_HEAD_PREFIXES:
            if key.startswith(prefix):
                heads.setdefault(prefix[:-1], {})[key[len(prefix) :]] = tensor
    return heads


def extract_rasa_state_dict(raw: dict) -> dict[str, torch.Tensor]:
    """The RASA head tensors (``pre_pos_layers.{j}.weight``, ``pos_pred.weight``) of a RASA file or a checkpoint."""
    state = {}
    for key, tensor in unwrap_state_dict(raw).items():
        key = strip_prefixes(key, (*STRIPPED_PREFIXES, RASA_PREFIX))
        if key.startswith(RASA_KEY_STARTS):
            state[key] = tensor
    if "pos_pred.weight" not in state:
        keys = sorted(unwrap_state_dict(raw))[:8]
        raise ValueError(f"not a RASA head file: no 'pos_pred.weight' (or 'rasa_head.pos_pred.weight'); keys: {keys}")
    return state


# ---------------------------------------------------------------------------------------------------------------------
# Writing the released naming


def to_release(
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


# ---------------------------------------------------------------------------------------------------------------------
# Position grid


def fit_pos_embed(pos_embed: torch.Tensor, grid: int, offset: float = 0.1, antialias: bool = False) -> torch.Tensor:
    """[1, 1 + M², D] → [1, 1 + grid², D] with the ViT's run-time interpolation (:func:`resize_pos_embed`), in the
    input's dtype; the input itself when M = grid (the model does not interpolate at its construction size either).
    So a model built at the new size reproduces the old model run at that size (high-resolution finetuning)."""
    if pos_embed.ndim == 3 and pos_embed.shape[1] - 1 == grid * grid:
        return pos_embed
    return resize_pos_embed(pos_embed, (grid, grid), offset, antialias).to(pos_embed.dtype)


def fit_position_grid(state: dict[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """A flat backbone state dict whose ``pos_embed`` fits ``config.img_size`` (resized as :func:`fit_pos_embed`)."""
    pos = state.get("pos_embed")
    if pos is None or pos.ndim != 3 or pos.shape[-1] != config.embed_dim:
        return state
    grid = config.img_size // config.patch_size
    return {**state, "pos_embed": fit_pos_embed(pos, grid, config.interpolate_offset, config.interpolate_antialias)}


def infer_image_size(state_dict: dict[str, torch.Tensor], patch_size: int) -> int:
    """Construction image size from ``pos_embed`` [1, 1+M², D]: M = √(rows−1), image = patch_size·M."""
    if "pos_embed" not in state_dict:
        raise KeyError("state dict has no 'pos_embed'; convert it with franca.models.weights.from_release first")
    rows = state_dict["pos_embed"].shape[1] - 1
    side = math.isqrt(rows)
    if side * side != rows:
        raise ValueError(f"pos_embed has {rows} patch rows, which is not a square grid M×M")
    return side * patch_size


# ---------------------------------------------------------------------------------------------------------------------
# Architecture inference


def _guess_heads(embed_dim: int, depth: int) -> int:
    for dim, arch_depth, heads in ARCHITECTURES.values():
        if (dim, arch_depth) == (embed_dim, depth):
            return heads
    for dim, _, heads in ARCHITECTURES.values():
        if dim == embed_dim:
            return heads
    if embed_dim % 64:
        raise ValueError(f"cannot guess num_heads for embed_dim={embed_dim}; pass num_heads= explicitly")
    return embed_dim // 64


def _swiglu_mlp_ratio(embed_dim: int, hidden: int) -> float:
    """An mlp_ratio whose SwiGLU width rounds to ``hidden`` (4.0 for every Franca model)."""
    if swiglu_hidden_dim(4 * embed_dim) == hidden:
        return 4.0
    for budget in range(hidden * 3 // 2 - 12, hidden * 3 // 2 + 13):
        ratio = budget / embed_dim
        if budget > 0 and int(embed_dim * ratio) == budget and swiglu_hidden_dim(budget) == hidden:
            return ratio
    raise ValueError(f"SwiGLU hidden width {hidden} cannot be built by our SwiGLUFFN (it must be a multiple of 8)")


def infer_config(
    state_dict: dict[str, torch.Tensor], num_heads: int | None = None, img_size: int | None = None
) -> ViTConfig:
    """The :class:`ViTConfig` of a flat backbone state dict. Everything but the head count is in the shapes; heads
    come from ``num_heads``, else the named architecture of that width (else width / 64, as DINOv2). A state dict
    without ``pos_embed`` (a RoPE backbone, whose position encoding the caller sets) needs ``img_size``."""
    required = ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", *(() if img_size else ("pos_embed",)))
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(f"not a ViT backbone state dict: missing {missing} (keys start with {sorted(state_dict)[:6]})")
    embed_dim, in_chans, patch_size, _ = state_dict["patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for key in state_dict if (m := _FLAT_BLOCK.match(key)))
    if "blocks.0.mlp.w12.weight" in state_dict:
        ffn_layer, ffn_bias_key = "swiglufused", "blocks.0.mlp.w12.bias"
        mlp_ratio = _swiglu_mlp_ratio(embed_dim, state_dict["blocks.0.mlp.w3.weight"].shape[1])
    elif "blocks.0.mlp.fc1.weight" in state_dict:
        ffn_layer, ffn_bias_key = "mlp", "blocks.0.mlp.fc1.bias"
        mlp_ratio = state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    else:
        raise ValueError("unknown feed-forward layer: neither 'blocks.0.mlp.w12.weight' nor 'blocks.0.mlp.fc1.weight'")
    registers = state_dict.get("register_tokens")
    return ViTConfig(
        img_size=infer_image_size(state_dict, patch_size) if "pos_embed" in state_dict else img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads or _guess_heads(embed_dim, depth),
        mlp_ratio=mlp_ratio,
        ffn_layer=ffn_layer,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        proj_bias="blocks.0.attn.proj.bias" in state_dict,
        ffn_bias=ffn_bias_key in state_dict,
        layerscale=1e-5 if "blocks.0.ls1.gamma" in state_dict else None,
        num_register_tokens=0 if registers is None else registers.shape[1],
    )


# ---------------------------------------------------------------------------------------------------------------------
# Strict loading


def _shape(value) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def _listed(label: str, items: list[str]) -> str:
    return f"{len(items)} {label} {items[:_LISTED]}{' …' if len(items) > _LISTED else ''}"


def mismatch_report(expected: dict, given: dict) -> str:
    """Missing, unexpected and mis-shaped keys (first few of each, in state-dict order); '' when ``given`` fits.
    Values are tensors or shapes."""
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    mismatched = [
        f"{key}: checkpoint {_shape(given[key])} vs model {_shape(expected[key])}"
        for key in expected
        if key in given and _shape(given[key]) != _shape(expected[key])
    ]
    lists = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
    parts = [_listed(label, items) for label, items in lists if items]
    return "; ".join(parts)


def check_fits(
    expected: dict,
    given: dict,
    source: str,
    target: str = "the model",
    hint: str = "",
    error: type[Exception] = WeightsMismatchError,
) -> None:
    """Raise ``error`` naming ``source``, ``target``, the :func:`mismatch_report` and ``hint`` (how to fix it)."""
    report = mismatch_report(expected, given)
    if report:
        raise error(f"checkpoint {source} does not fit {target}: {report}.{' ' + hint if hint else ''}")


def load_strict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    source: str,
    target: str = "the model",
    hint: str = "",
    assign: bool = False,
) -> None:
    """Load ``state_dict`` into ``model`` strictly (after :func:`check_fits`), cast to the model's dtypes.
    ``assign=True`` for a model built on the ``meta`` device."""
    expected = model.state_dict()
    check_fits(expected, state_dict, source, target, hint)
    cast = {key: tensor.to(dtype=expected[key].dtype) for key, tensor in state_dict.items()}
    model.load_state_dict(cast, strict=True, assign=assign)
