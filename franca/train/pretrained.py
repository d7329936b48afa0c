"""``student.pretrained_weights``: the backbone (and, when the file has them, the heads) a run starts from.

A run that adapts a backbone needs no architecture in its YAML: :func:`resolve_pretrained` reads the file once (anything
:func:`franca.hub.franca_from_checkpoint` reads), takes the backbone's architecture off it (width, depth, heads, patch,
FFN, registers, biases, position-grid interpolation) for every ``student.*`` key the config file and the overrides
leave to the defaults, and the global crop size from the model's native size (the local crops keep Franca's 96/224
ratio to the global ones). A key the config sets to another value than the file's is an error naming both.
:func:`load_pretrained` then initialises both backbones, and both heads when the file carries DINO / iBOT heads
that fit the configured ones (``student.pretrained_heads``).

Reading the weights needs the whole of :mod:`franca.hub` (release names, URLs with their SHA-256 rules, export
folders), so this module sits with the entry points (docs/architecture.md); the trainer passes :func:`load_pretrained`
to :func:`franca.train.build.build_model`.
"""

from collections.abc import Iterable
from dataclasses import dataclass, fields

import torch
from omegaconf import DictConfig

from franca.hub import load_backbone_and_heads
from franca.models.config import ViTConfig
from franca.train.config import TRAINING_SCHEMA
from franca.train.ssl_meta_arch import SSLMetaArch
from franca.utils.config_schema import ConfigError

# ViTConfig fields that the student section sets one to one.
STUDENT_FIELDS = (
    "patch_size",
    "ffn_layer",
    "mlp_ratio",
    "num_register_tokens",
    "qkv_bias",
    "proj_bias",
    "ffn_bias",
    "interpolate_offset",
    "interpolate_antialias",
    "layer_norm_eps",
    "position_encoding",
    "rope_base",
    "rope_normalize_coords",
)
# ViTConfig fields that are not read off the file: the input, training-only settings, and those handled apart (the
# width/depth/heads through student.arch, LayerScale, the native size through the crops).
NOT_ARCHITECTURE = ("img_size", "in_chans", "drop_path_rate", "drop_path_uniform", "layerscale")
WIDTH_KEYS = ("student.arch", "student.embed_dim", "student.depth", "student.num_heads")


@dataclass
class PretrainedWeights:
    """The weights of ``student.pretrained_weights``, read once: the backbone's architecture and state dict, and the
    DINO / iBOT heads the file carries (empty for released backbones)."""

    source: str
    config: ViTConfig
    backbone: dict[str, torch.Tensor]
    heads: dict[str, dict[str, torch.Tensor]]

    @classmethod
    def read(cls, source: str) -> "PretrainedWeights":
        model, heads = load_backbone_and_heads(source, argument="student.pretrained_weights")
        state = {key: value for key, value in model.state_dict().items() if not key.startswith("rasa_head.")}
        return cls(source, model.config, state, heads)


def _same(field: str, configured, stored) -> bool:
    if field == "ffn_layer":  # swiglufused is the original configs' name for swiglu
        return {configured, stored} <= {"swiglu", "swiglufused"} or configured == stored
    return configured == stored


def _configured_dims(student: DictConfig) -> tuple[int, int, int]:
    named = ViTConfig.for_arch(student.arch)
    return (
        student.embed_dim or named.embed_dim,
        student.depth or named.depth,
        student.num_heads or named.num_heads,
    )


def apply_architecture(cfg: DictConfig, stored: ViTConfig, explicit: Iterable[str], source: str) -> list[str]:
    """Fill ``cfg.student`` and ``cfg.crops`` from the file's architecture where the config leaves them to the
    defaults (``explicit``: the keys it sets); returns what was taken. A contradiction is a :class:`ConfigError`."""
    explicit = set(explicit)
    conflicts, taken = [], []
    student = cfg.student

    def conflict(key: str, configured, stored_value) -> None:
        conflicts.append(f"{key}={configured!r} but the file has {stored_value!r}")

    dims = (stored.embed_dim, stored.depth, stored.num_heads)
    if explicit & set(WIDTH_KEYS):
        if _configured_dims(student) != dims:
            conflict("student.arch/embed_dim/depth/num_heads", _configured_dims(student), dims)
    else:
        student.arch = stored.arch or student.arch
        student.embed_dim, student.depth, student.num_heads = dims
        taken.append(f"{stored.label} ({stored.embed_dim}-d, {stored.depth} blocks, {stored.num_heads} heads)")
    for field in STUDENT_FIELDS:
        key, value = f"student.{field}", getattr(stored, field)
        if key in explicit:
            if not _same(field, student[field], value):
                conflict(key, student[field], value)
        else:
            student[field] = value
    has_layerscale = bool(stored.layerscale)
    if "student.layerscale" in explicit and bool(student.layerscale) != has_layerscale:
        conflict("student.layerscale", student.layerscale, "LayerScale" if has_layerscale else "no LayerScale")
    elif not has_layerscale:
        student.layerscale = 0.0
    unsupported = [
        f"{f.name}={getattr(stored, f.name)!r}"
        for f in fields(ViTConfig)
        if f.name not in (*STUDENT_FIELDS, *NOT_ARCHITECTURE, "embed_dim", "depth", "num_heads")
        and getattr(stored, f.name) != f.default
    ]
    if unsupported:
        raise ConfigError(
            f"student.pretrained_weights={source!r} is a backbone the trainer cannot build ({', '.join(unsupported)} "
            "has no student.* key); evaluate or distil it instead"
        )
    if conflicts:
        raise ConfigError(
            f"student.pretrained_weights={source!r} contradicts the config: {'; '.join(conflicts)}. Remove those keys "
            "from the config (the architecture is read off the file) or give weights of that architecture"
        )
    taken.append(f"{stored.ffn_layer} FFN, {stored.num_register_tokens} registers")
    taken += _native_crops(cfg, stored, explicit)
    return taken


def _native_crops(cfg: DictConfig, stored: ViTConfig, explicit: set[str]) -> list[str]:
    """Global crops at the model's native size, and local crops at the default ratio to the global ones (96/224 as
    Franca's recipes, rounded to the patch), unless the config sets them."""
    crops, patch = cfg.crops, stored.patch_size
    taken = []
    defaults = TRAINING_SCHEMA.fields
    ratio = defaults["crops.local_crops_size"].default / defaults["crops.global_crops_size"].default
    if "crops.global_crops_size" not in explicit:
        crops.global_crops_size = stored.img_size
        taken.append(f"global crops {stored.img_size} px (the model's native size)")
    if "crops.local_crops_size" not in explicit:
        crops.local_crops_size = max(patch, round(crops.global_crops_size * ratio / patch) * patch)
        taken.append(f"local crops {crops.local_crops_size} px")
    return taken


def resolve_pretrained(cfg: DictConfig, explicit: Iterable[str]) -> PretrainedWeights | None:
    """Read ``student.pretrained_weights`` (None when it is '') and complete ``cfg`` from it
    (:func:`apply_architecture`), printing what was taken from the file."""
    source = cfg.student.pretrained_weights
    if not source:
        return None
    weights = PretrainedWeights.read(source)
    taken = apply_architecture(cfg, weights.config, explicit, source)
    if taken:
        print(f"student.pretrained_weights={source}: from the file: {'; '.join(taken)}", flush=True)
    return weights


def load_pretrained(cfg: DictConfig, model: SSLMetaArch, weights: PretrainedWeights | None = None) -> None:
    """Both backbones of ``model`` from ``student.pretrained_weights`` (read here unless ``weights`` are given;
    nothing when it is ''), and both heads when the file has heads that fit (``student.pretrained_heads``)."""
    source = cfg.student.pretrained_weights
    if not source:
        return
    weights = weights or PretrainedWeights.read(source)
    model.load_pretrained_backbone(weights.backbone)
    print(f"initialised student and teacher backbones from {source} ({_load_heads(cfg, model, weights)})", flush=True)


def _load_heads(cfg: DictConfig, model: SSLMetaArch, weights: PretrainedWeights) -> str:
    """Load the file's heads into both heads per ``student.pretrained_heads``; says what happened."""
    setting = cfg.student.pretrained_heads
    if setting == "false":
        return "heads are fresh: student.pretrained_heads=false"
    names = [name for name in model.student.keys() if name != "backbone"]
    missing = [name for name in names if name not in weights.heads]
    misfit = [name for name in names if name in weights.heads and not _fits(model.student[name], weights.heads[name])]
    if missing or misfit:
        why = (
            f"the file has no {', '.join(missing)} (released backbones carry no heads)"
            if missing
            else f"the file's {', '.join(misfit)} have other shapes than the configured heads (dino.* / ibot.*)"
        )
        if setting == "true":
            raise ConfigError(f"student.pretrained_heads=true, but {why}; set it to auto or false for fresh heads")
        return f"heads are fresh: {why}"
    for name in names:
        for models in (model.student, model.teacher):
            models[name].load_state_dict(weights.heads[name])
    return f"{' and '.join(names)} from the file"


def _fits(head: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = head.state_dict()
    return own.keys() == state.keys() and all(own[k].shape == state[k].shape for k in own)
