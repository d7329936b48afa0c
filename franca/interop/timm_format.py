"""Our ViT ↔ a timm Hub folder (``config.json`` with ``architecture``, ``model_args``, ``pretrained_cfg``;
``model.safetensors``), the layout ``timm.create_model("local-dir:DIR", pretrained=True)`` reads.

Out: timm's DINOv2 ViTs with our shape in ``model_args``: ``vit_base_patch14_dinov2`` (GELU MLP) or
``vit_giant_patch14_dinov2`` (the packed SwiGLU: timm's ``fc1`` = our ``w12``, gate first), their ``reg4`` variants
with registers (timm adds no position to CLS or registers there, so CLS carries its position row). The model is
built with ``dynamic_img_size=True`` and ``num_classes=0``. In: those DINOv2-style ``VisionTransformer`` s and
timm's DINOv3 ``Eva`` models (RoPE, storage tokens as ``reg_token``, fused qkv with q/v biases and none for k).

timm resizes position embeddings with ``size=`` and antialiasing (``resample_abs_pos_embed``), without the 0.1
offset; a timm folder therefore loads with ``interpolate_offset=0`` and ``interpolate_antialias=True``, so franca gives
the library's outputs at every size. A folder we exported carries ``franca_config.json`` (docs/export.md).
"""

from dataclasses import dataclass

import torch
from torch import nn

from franca.interop.renaming import ForeignFormatError, KeyMap, join_parameters, join_rows
from franca.models.config import ViTConfig
from franca.models.weights import infer_config

TIMM_LAYER_NORM_EPS = 1e-6  # the LayerNorm of timm's VisionTransformer
MLP_KINDS = ("mlp", "packed_swiglu", "split_swiglu")


def _weight_and_bias(names: dict[str, str]) -> dict[str, str]:
    return {f"{ours}.{part}": f"{theirs}.{part}" for ours, theirs in names.items() for part in ("weight", "bias")}


_PATCH_AND_NORM = _weight_and_bias({"patch_embed.proj": "patch_embed.proj", "norm": "norm"})
_BLOCK_COMMON = _weight_and_bias({"norm1": "norm1", "norm2": "norm2", "attn.qkv": "attn.qkv", "attn.proj": "attn.proj"})
_MLP_NAMES = {
    "mlp": {"mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"},
    "packed_swiglu": {"mlp.w12": "mlp.fc1", "mlp.w3": "mlp.fc2"},
    "split_swiglu": {"mlp.gate": "mlp.fc1_g", "mlp.up": "mlp.fc1_x", "mlp.w3": "mlp.fc2"},
}


@dataclass(frozen=True)
class TimmBackbone:
    """What franca needs to know about a timm model beyond its tensors (read off the built model)."""

    family: str  # "vit" (VisionTransformer) or "eva" (DINOv3)
    num_heads: int
    layer_norm_eps: float
    img_size: int
    mlp_kind: str
    no_embed_class: bool = False
    rope_base: float = 100.0
    rope_normalize_coords: str = "separate"

    def key_map(self) -> KeyMap:
        if self.family == "vit":
            top = {"cls_token": "cls_token", "register_tokens": "reg_token", "pos_embed": "pos_embed"}
            scale = {"ls1.gamma": "ls1.gamma", "ls2.gamma": "ls2.gamma"}
            qkv_bias = {"attn.qkv.bias": "attn.qkv.bias"}
        else:
            top = {"cls_token": "cls_token", "register_tokens": "reg_token"}
            scale = {"ls1.gamma": "gamma_1", "ls2.gamma": "gamma_2"}
            qkv_bias = {"attn.q.bias": "attn.q_bias", "attn.v.bias": "attn.v_bias"}
        block = {**_BLOCK_COMMON, **scale, **_weight_and_bias(_MLP_NAMES[self.mlp_kind])}
        block = {ours: theirs for ours, theirs in block.items() if ours != "attn.qkv.bias"}
        return KeyMap(top={**top, **_PATCH_AND_NORM}, block={**block, **qkv_bias}, block_prefix="blocks.")


# ---------------------------------------------------------------------------------------------------------------------
# Out


def timm_architecture(config: ViTConfig) -> tuple[str, dict]:
    """(timm architecture name, ``model_args``) of the timm ViT that computes what ``config``'s ViT computes."""
    if config.uses_rope:
        raise ForeignFormatError(
            "exporting a RoPE (DINOv3) backbone is not supported: the transformers and timm exports write "
            "DINOv2-style models with learned position embeddings"
        )
    if config.layer_norm_eps != TIMM_LAYER_NORM_EPS:
        raise ForeignFormatError(
            f"layer_norm_eps={config.layer_norm_eps}: timm's DINOv2 ViT uses {TIMM_LAYER_NORM_EPS} and takes no other "
            "value through its config; export this backbone with --format transformers"
        )
    swiglu = config.ffn_layer != "mlp"
    registers = config.num_register_tokens
    name = f"vit_{'giant' if swiglu else 'base'}_patch14_{'reg4_' if registers else ''}dinov2"
    if swiglu:  # timm's packed SwiGLU takes the width of fc1 (2 × hidden): int(D · ratio) must give exactly that
        hidden = int(config.embed_dim * config.mlp_ratio)
        packed = 2 * ((int(hidden * 2 / 3) + 7) // 8 * 8)
        mlp_ratio = (packed + 0.5) / config.embed_dim
    else:
        mlp_ratio = config.mlp_ratio
    return name, {
        "img_size": config.img_size,
        "patch_size": config.patch_size,
        "in_chans": config.in_chans,
        "embed_dim": config.embed_dim,
        "depth": config.depth,
        "num_heads": config.num_heads,
        "mlp_ratio": mlp_ratio,
        "qkv_bias": config.qkv_bias,
        "init_values": config.layerscale or 1.0,
        "reg_tokens": registers,
        "no_embed_class": registers > 0,
        "num_classes": 0,
        "global_pool": "token",
        "dynamic_img_size": True,
    }


def to_timm_state(state: dict[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """Our flat keys (completed with :func:`~franca.interop.renaming.complete_for_export`) → timm's, for the model of
    :func:`timm_architecture`. The mask token (training only) is left out; with registers CLS takes its position
    row, because timm's ``no_embed_class`` adds positions to the patches only."""
    state = {key: tensor for key, tensor in state.items() if key != "mask_token"}
    if config.num_register_tokens:
        state["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
        state["pos_embed"] = state["pos_embed"][:, 1:]
    mlp_kind = "mlp" if config.ffn_layer == "mlp" else "packed_swiglu"
    description = TimmBackbone("vit", config.num_heads, config.layer_norm_eps, config.img_size, mlp_kind)
    return description.key_map().to_theirs(state)


def pretrained_cfg(config: ViTConfig, resize: int, mean: tuple, std: tuple, license_id: str) -> dict:
    """timm's preprocessing record: centre crop ``img_size`` of an image resized to ``resize`` (bicubic), our
    normalisation (franca's classification evaluation transform)."""
    return {
        "input_size": [config.in_chans, config.img_size, config.img_size],
        "fixed_input_size": False,
        "interpolation": "bicubic",
        "crop_pct": config.img_size / resize,
        "crop_mode": "center",
        "mean": list(mean),
        "std": list(std),
        "num_classes": 0,
        "pool_size": None,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": license_id,
    }


# ---------------------------------------------------------------------------------------------------------------------
# In


def _require_identity(module: nn.Module, what: str, source: str) -> None:
    if not isinstance(module, nn.Identity):
        raise ForeignFormatError(f"{source}: the timm model has {what} ({type(module).__name__}); franca's has none")


def _square(value, name: str, source: str) -> int:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value, value)
    if len(set(values)) != 1:
        raise ForeignFormatError(f"{source}: {name}={values} is not square; franca ViTs use square sizes")
    return int(values[0])


def _mlp_kind(mlp: nn.Module, source: str) -> str:
    act = getattr(mlp, "act", None)
    kind = {"Mlp": "mlp", "GluMlp": "packed_swiglu", "SwiGLU": "split_swiglu"}.get(type(mlp).__name__)
    expected = nn.GELU if kind == "mlp" else nn.SiLU
    ok = kind is not None and type(act) is expected and getattr(act, "approximate", "none") == "none"
    if ok and kind == "packed_swiglu":
        ok = not mlp.gate_last
    if not ok:
        raise ForeignFormatError(
            f"{source}: feed-forward {type(mlp).__name__} with {type(act).__name__}; franca reads a GELU MLP or a "
            "SwiGLU (SiLU gate first)"
        )
    _require_identity(mlp.norm, "a norm inside the MLP", source)
    return kind


def _check_attention(attn: nn.Module, source: str) -> None:
    for name, what in (("q_norm", "a query norm"), ("k_norm", "a key norm"), ("norm", "a norm inside attention")):
        _require_identity(getattr(attn, name, nn.Identity()), what, source)
    if getattr(attn, "gate", None) is not None or getattr(attn, "qkv", None) is None:
        raise ForeignFormatError(f"{source}: attention without one fused qkv projection (or gated); not readable")


def _check_common(model: nn.Module, source: str) -> None:
    if model.cls_token is None:
        raise ForeignFormatError(f"{source}: the timm model has no class token; franca's ViT needs one")
    _require_identity(model.norm_pre, "a norm before the blocks", source)
    _require_identity(model.patch_embed.norm, "a norm in the patch embedding", source)
    if isinstance(model.norm, nn.Identity):
        raise ForeignFormatError(f"{source}: the timm model normalises after pooling (fc_norm); franca's ViT cannot")


def describe(model: nn.Module, source: str) -> TimmBackbone:
    """The :class:`TimmBackbone` of a built timm model; a model franca cannot represent is a ForeignFormatError."""
    family = {"VisionTransformer": "vit", "Eva": "eva"}.get(type(model).__name__)
    if family is None:
        raise ForeignFormatError(
            f"{source} is a timm {type(model).__name__}; franca reads DINOv2-style VisionTransformer and DINOv3 Eva "
            "backbones"
        )
    _check_common(model, source)
    block = model.blocks[0]
    expected_block = {"vit": "Block", "eva": "EvaBlock"}[family]
    if type(block).__name__ != expected_block:
        raise ForeignFormatError(f"{source}: timm blocks of type {type(block).__name__}; franca reads {expected_block}")
    _check_attention(block.attn, source)
    common = dict(
        num_heads=block.attn.num_heads,
        layer_norm_eps=model.norm.eps,
        img_size=_square(model.patch_embed.img_size, "img_size", source),
        mlp_kind=_mlp_kind(block.mlp, source),
    )
    if family == "vit":
        if model.num_reg_tokens and not model.no_embed_class:
            raise ForeignFormatError(f"{source}: registers with position embeddings; franca adds none to registers")
        return TimmBackbone("vit", no_embed_class=model.no_embed_class, **common)
    return TimmBackbone("eva", **common, **_eva_rope(model, source))


def _eva_rope(model: nn.Module, source: str) -> dict:
    rope = model.rope
    plain = (
        type(rope).__name__ == "RotaryEmbeddingDinoV3"
        and model.pos_embed is None
        and rope.temperature is not None
        and rope.min_period is None
        and rope.grid_offset == 0
        and rope.grid_indexing == "ij"
        and rope.rotate_half
    )
    if not plain:
        raise ForeignFormatError(
            f"{source}: an Eva model without DINOv3's RoPE (no learned positions, base period, centred 'ij' grid, "
            "rotate-half); franca reads the DINOv3 variant"
        )
    block = model.blocks[0]
    if (block.gamma_1 is None) != (block.gamma_2 is None):
        raise ForeignFormatError(f"{source}: LayerScale on one branch only; franca's blocks scale both or none")
    return {"rope_base": float(rope.temperature), "rope_normalize_coords": rope.normalize_coords}


def from_timm(description: TimmBackbone, state: dict[str, torch.Tensor], source: str) -> tuple[ViTConfig, dict]:
    """(ViTConfig, our flat state dict) of a described timm model's tensors."""
    ours = description.key_map().to_ours(state, source)
    dim = ours["cls_token"].shape[-1]
    ours["mask_token"] = torch.zeros(1, dim, dtype=ours["cls_token"].dtype)
    if description.family == "eva":
        ours = join_parameters(ours, ("mlp.gate", "mlp.up"), "mlp.w12")
        ours = join_rows(ours, ("attn.q.bias", "attn.k.bias", "attn.v.bias"), "attn.qkv.bias")
        config = infer_config(ours, description.num_heads, img_size=description.img_size).with_overrides(
            position_encoding="rope",
            rope_base=description.rope_base,
            rope_normalize_coords=description.rope_normalize_coords,
            layer_norm_eps=description.layer_norm_eps,
        )
        return config, ours
    if description.no_embed_class:
        ours["pos_embed"] = torch.cat((torch.zeros_like(ours["pos_embed"][:, :1]), ours["pos_embed"]), dim=1)
    if description.mlp_kind == "split_swiglu":
        ours = join_parameters(ours, ("mlp.gate", "mlp.up"), "mlp.w12")
    config = infer_config(ours, description.num_heads).with_overrides(
        layer_norm_eps=description.layer_norm_eps, interpolate_offset=0.0, interpolate_antialias=True
    )
    return config, ours
