"""Our ViT ↔ a Hugging Face ``transformers`` folder (``config.json`` + ``model.safetensors``).

Out: a Franca / DINOv2-style backbone becomes a ``Dinov2Model`` (``Dinov2WithRegistersModel`` with registers), whose
``use_swiglu_ffn`` layer is our SwiGLU (packed ``weights_in`` = our ``w12``, gate first). Tensors are written under
the names of the models on the Hugging Face Hub (``encoder.layer.{i}.attention.attention.query``, …), which every
transformers version reads. In: those two model types and ``DINOv3ViTModel`` (RoPE, storage tokens, no key bias).

The transformers port of DINOv2 resizes position embeddings with ``size=`` (no 0.1 offset; antialiased with
registers), so a DINOv2 folder loads with ``interpolate_offset=0`` (and ``interpolate_antialias`` for registers):
franca then gives the library's outputs at every image size. A folder we exported carries ``franca_config.json``,
which restores our own settings (docs/export.md).
"""

import torch

from franca.interop.renaming import ForeignFormatError, KeyMap, join_parameters, split_parameters
from franca.models.config import ViTConfig
from franca.models.weights import infer_config

QKV = ("attn.q", "attn.k", "attn.v")
DINOV2_TYPES = {False: ("dinov2", "Dinov2Model"), True: ("dinov2_with_registers", "Dinov2WithRegistersModel")}
DINOV3_TYPE = "dinov3_vit"
READABLE_TYPES = (*(model_type for model_type, _ in DINOV2_TYPES.values()), DINOV3_TYPE)
IMAGE_PROCESSOR = "BitImageProcessor"


def _weight_and_bias(pairs: dict[str, str]) -> dict[str, str]:
    return {f"{ours}.{part}": f"{theirs}.{part}" for ours, theirs in pairs.items() for part in ("weight", "bias")}


def _layer_names(attention: tuple[str, str, str, str], mlp: dict[str, str]) -> dict[str, str]:
    """Per-layer names of transformers' DINO models: the shared norms and layer scales, the given query / key /
    value / output and feed-forward names."""
    query, key, value, output = attention
    names = {"norm1": "norm1", "norm2": "norm2", "attn.q": query, "attn.k": key, "attn.v": value, "attn.proj": output}
    return {
        "ls1.gamma": "layer_scale1.lambda1",
        "ls2.gamma": "layer_scale2.lambda1",
        **_weight_and_bias({**names, **mlp}),
    }


DINOV2_KEYS = KeyMap(
    top={
        "cls_token": "embeddings.cls_token",
        "mask_token": "embeddings.mask_token",
        "pos_embed": "embeddings.position_embeddings",
        "register_tokens": "embeddings.register_tokens",
        **_weight_and_bias({"patch_embed.proj": "embeddings.patch_embeddings.projection", "norm": "layernorm"}),
    },
    block=_layer_names(
        ("attention.attention.query", "attention.attention.key", "attention.attention.value", "attention.output.dense"),
        {"mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "mlp.w12": "mlp.weights_in", "mlp.w3": "mlp.weights_out"},
    ),
    block_prefix="encoder.layer.",
)


def _dinov3_keys(gated: bool) -> KeyMap:
    mlp = {"mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.w3": "mlp.down_proj"}
    plain = {"mlp.fc1": "mlp.up_proj", "mlp.fc2": "mlp.down_proj"}
    return KeyMap(
        top={
            "cls_token": "embeddings.cls_token",
            "mask_token": "embeddings.mask_token",
            "register_tokens": "embeddings.register_tokens",
            **_weight_and_bias({"patch_embed.proj": "embeddings.patch_embeddings", "norm": "norm"}),
        },
        block=_layer_names(
            ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"), mlp if gated else plain
        ),
        block_prefix="layer.",
    )


# ---------------------------------------------------------------------------------------------------------------------
# Out


def check_exportable(config: ViTConfig) -> None:
    """Refuse what a ``Dinov2Model`` cannot hold, naming the field."""
    if config.uses_rope:
        raise ForeignFormatError(
            "exporting a RoPE (DINOv3) backbone is not supported: the transformers and timm exports write "
            "DINOv2-style models with learned position embeddings"
        )
    if not float(config.mlp_ratio).is_integer():
        raise ForeignFormatError(
            f"mlp_ratio={config.mlp_ratio}: transformers' Dinov2Config takes an integer mlp_ratio, so this "
            "feed-forward width cannot be exported to transformers; export it with --format timm"
        )


def transformers_config(config: ViTConfig, dtype: torch.dtype) -> dict:
    """``config.json`` of the ``Dinov2Model`` that computes what ``config``'s ViT computes (all fields written)."""
    check_exportable(config)
    model_type, architecture = DINOV2_TYPES[config.num_register_tokens > 0]
    fields = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": config.embed_dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "mlp_ratio": int(config.mlp_ratio),
        "hidden_act": "gelu",
        "layer_norm_eps": config.layer_norm_eps,
        "image_size": config.img_size,
        "patch_size": config.patch_size,
        "num_channels": config.in_chans,
        "qkv_bias": config.qkv_bias,
        "layerscale_value": config.layerscale or 1.0,
        "use_swiglu_ffn": config.ffn_layer != "mlp",
        "drop_path_rate": 0.0,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if config.num_register_tokens:
        fields["num_register_tokens"] = config.num_register_tokens
    else:
        fields["use_mask_token"] = True
    return fields


def to_transformers_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our flat keys (completed with :func:`~franca.interop.renaming.complete_for_export`) → Dinov2 Hub names."""
    return DINOV2_KEYS.to_theirs(split_parameters(state, "attn.qkv", QKV))


def preprocessor_config(img_size: int, resize: int, mean: tuple, std: tuple) -> dict:
    """``preprocessor_config.json``: shorter side to ``resize`` (bicubic), centre crop ``img_size``, our
    normalisation (franca's classification evaluation transform, ``make_classification_eval_transform``)."""
    return {
        "image_processor_type": IMAGE_PROCESSOR,
        "do_resize": True,
        "size": {"shortest_edge": resize},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": img_size, "width": img_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
        "do_convert_rgb": True,
    }


# ---------------------------------------------------------------------------------------------------------------------
# In


def _square(value, name: str, source: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ForeignFormatError(f"{source}: {name}={list(value)} is not square; franca ViTs use square sizes")
        value = value[0]
    return int(value)


def _check_activation(hf: dict, expected: str, source: str) -> None:
    if hf.get("hidden_act", expected) != expected:
        raise ForeignFormatError(
            f"{source}: hidden_act={hf['hidden_act']!r}; franca's feed-forward layer here uses {expected!r} only"
        )


def _dinov2_from_transformers(hf: dict, state: dict, source: str) -> tuple[ViTConfig, dict]:
    if not hf.get("use_swiglu_ffn"):
        _check_activation(hf, "gelu", source)
    ours = join_parameters(DINOV2_KEYS.to_ours(state, source), QKV, "attn.qkv")
    ours.setdefault("mask_token", torch.zeros(1, hf["hidden_size"], dtype=ours["cls_token"].dtype))
    config = infer_config(ours, num_heads=hf["num_attention_heads"]).with_overrides(
        layer_norm_eps=hf["layer_norm_eps"],
        interpolate_offset=0.0,
        interpolate_antialias=hf["model_type"] == "dinov2_with_registers",
    )
    return config, ours


def _dinov3_from_transformers(hf: dict, state: dict, source: str) -> tuple[ViTConfig, dict]:
    gated = bool(hf.get("use_gated_mlp"))
    _check_activation(hf, "silu" if gated else "gelu", source)
    ours = join_parameters(
        join_parameters(_dinov3_keys(gated).to_ours(state, source), QKV, "attn.qkv"), ("mlp.gate", "mlp.up"), "mlp.w12"
    )
    ours["mask_token"] = ours["mask_token"].reshape(1, -1)
    if ours.get("register_tokens") is not None and ours["register_tokens"].shape[1] == 0:
        del ours["register_tokens"]
    config = infer_config(
        ours, num_heads=hf["num_attention_heads"], img_size=_square(hf["image_size"], "image_size", source)
    ).with_overrides(
        layer_norm_eps=hf["layer_norm_eps"],
        position_encoding="rope",
        rope_base=float(hf["rope_theta"]),
        rope_normalize_coords="separate",
    )
    return config, ours


def from_transformers(hf: dict, state: dict[str, torch.Tensor], source: str) -> tuple[ViTConfig, dict]:
    """(ViTConfig, our flat state dict) of a transformers model given its full config dict and its tensors."""
    model_type = hf.get("model_type")
    if model_type not in READABLE_TYPES:
        raise ForeignFormatError(
            f"{source} is a transformers {model_type!r} model; franca reads {', '.join(READABLE_TYPES)} backbones"
        )
    _square(hf["patch_size"], "patch_size", source)
    if model_type == DINOV3_TYPE:
        return _dinov3_from_transformers(hf, state, source)
    return _dinov2_from_transformers(hf, state, source)
