"""The one description of a backbone: :class:`ViTConfig`, the constructor arguments of ``DinoVisionTransformer``.

The same frozen dataclass is built by the trainer (from ``cfg.student``), read off a state dict
(:func:`franca.models.weights.infer_config`), stored by exports as a plain dict (:meth:`ViTConfig.to_dict`: the
``backbone_config`` of release ``.pth`` files and the ``config.json`` of safetensors folders) and read back from one
(:meth:`ViTConfig.from_dict`). Beside the fields, a stored dict may carry ``input_decoding``: how image files were
decoded into what the model saw in training (:func:`stored_input_decoding`; read by the hub, followed by evaluation,
the demo and the exports). Defaults are the released Franca ViT (patch 14, SwiGLU, LayerScale 1e-5, no
registers, learned position embeddings interpolated with offset 0.1, LayerNorm eps 1e-6; valeoai/Franca
``franca/hub/backbones.py``) at ViT-B/14 size. ``position_encoding="rope"`` with ``rope_base`` and
``rope_normalize_coords`` describes DINOv3 backbones instead (rotary embeddings, no table; docs/export.md).
"""

from dataclasses import asdict, dataclass, fields, replace

# name -> (embed_dim, depth, num_heads); head dim is always embed_dim / num_heads.
ARCHITECTURES = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_giant2": (1536, 40, 24),
}
FFN_LAYER_NAMES = ("mlp", "swiglu", "swiglufused")
# "learned": a position-embedding table added to the tokens (Franca, DINOv2); "rope": 2-D rotary embeddings of the
# patch queries and keys, no table (DINOv3; franca.layers.rope).
POSITION_ENCODINGS = ("learned", "rope")
ROPE_COORDINATE_NORMALISATIONS = ("separate", "min", "max")
ARCH_KEY = "arch"
INPUT_DECODING_KEY = "input_decoding"
INPUT_DECODING_FIELDS = ("alpha_background", "image_max_value")


@dataclass(frozen=True)
class ViTConfig:
    """Constructor arguments of ``DinoVisionTransformer`` (see its module for what each does)."""

    img_size: int = 224
    patch_size: int = 14
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    ffn_layer: str = "swiglufused"
    layerscale: float | None = 1e-5
    drop_path_rate: float = 0.0
    drop_path_uniform: bool = True
    num_register_tokens: int = 0
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    layer_norm_eps: float = 1e-6
    position_encoding: str = "learned"
    rope_base: float = 100.0
    rope_normalize_coords: str = "separate"

    def __post_init__(self) -> None:
        if self.ffn_layer not in FFN_LAYER_NAMES:
            raise ValueError(f"ffn_layer={self.ffn_layer!r} is unknown; choose one of {sorted(FFN_LAYER_NAMES)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}; pick a head count "
                "that divides the width"
            )
        if self.position_encoding not in POSITION_ENCODINGS:
            raise ValueError(
                f"position_encoding={self.position_encoding!r} is unknown; choose one of {list(POSITION_ENCODINGS)}"
            )
        if self.rope_normalize_coords not in ROPE_COORDINATE_NORMALISATIONS:
            raise ValueError(
                f"rope_normalize_coords={self.rope_normalize_coords!r} is unknown; choose one of "
                f"{list(ROPE_COORDINATE_NORMALISATIONS)}"
            )
        if self.uses_rope and (self.embed_dim // self.num_heads) % 4:
            raise ValueError(
                f"RoPE needs a head dimension divisible by 4 (two axes, sine and cosine halves); embed_dim="
                f"{self.embed_dim} / num_heads={self.num_heads} gives {self.embed_dim // self.num_heads}"
            )

    @property
    def uses_rope(self) -> bool:
        """Rotary position embeddings instead of a learned table (DINOv3)."""
        return self.position_encoding == "rope"

    @property
    def arch(self) -> str | None:
        """The name in :data:`ARCHITECTURES` with this (embed_dim, depth, num_heads), or None."""
        dims = (self.embed_dim, self.depth, self.num_heads)
        return next((name for name, spec in ARCHITECTURES.items() if spec == dims), None)

    @property
    def label(self) -> str:
        """A short name for messages: ``vit_base/14``, or ``ViT 64-d x 2 blocks/4`` for a non-standard size."""
        name = self.arch or f"ViT {self.embed_dim}-d x {self.depth} blocks"
        return f"{name}/{self.patch_size}"

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def for_arch(cls, arch: str, **overrides) -> "ViTConfig":
        """One of :data:`ARCHITECTURES` by name; keywords (``depth`` too) override its values and the defaults."""
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
        _check_names(overrides, f"{cls.__name__}.for_arch({arch!r}, ...)", TypeError)
        dims = dict(zip(("embed_dim", "depth", "num_heads"), ARCHITECTURES[arch], strict=True))
        return cls(**{**dims, **overrides})

    def with_overrides(self, **overrides) -> "ViTConfig":
        """A copy with some fields changed; an unknown name is a TypeError that lists the fields."""
        _check_names(overrides, "ViT keyword", TypeError)
        return replace(self, **overrides)

    def inference(self) -> "ViTConfig":
        """The same backbone without stochastic depth: what exports store and loaders rebuild."""
        return replace(self, drop_path_rate=0.0, drop_path_uniform=True)

    def to_dict(self) -> dict:
        """The stored form: ``"arch"`` (name or None) and every field, JSON-serialisable."""
        return {ARCH_KEY: self.arch, **asdict(self)}

    @classmethod
    def from_dict(cls, stored: dict, source: str = "a stored backbone config") -> "ViTConfig":
        """Read :meth:`to_dict` output back (also older files that lack some fields: they take the defaults, and an
        ``arch`` name supplies the width, depth and heads the dict does not give). ``input_decoding`` is side data,
        not a constructor field (:func:`stored_input_decoding` reads it). Unknown keys are refused."""
        if not isinstance(stored, dict):
            raise ValueError(f"{source} must be a dict of ViT fields, got {type(stored).__name__}")
        values = dict(stored)
        arch = values.pop(ARCH_KEY, None)
        values.pop(INPUT_DECODING_KEY, None)
        _check_names(values, source, ValueError)
        if arch is None:
            return cls(**values)
        if arch not in ARCHITECTURES:
            raise ValueError(f"{source} names arch={arch!r}, which is not one of {sorted(ARCHITECTURES)}")
        return cls.for_arch(arch, **values)

    @classmethod
    def from_student_config(cls, student, img_size: int, drop_path: bool = True) -> "ViTConfig":
        """The trained backbone from the ``student`` section of a training config (embed_dim/depth/num_heads 0 =
        the value of ``student.arch``); ``drop_path=False`` for the teacher."""
        overrides = {key: student[key] for key in ("embed_dim", "depth", "num_heads") if student[key]}
        return cls.for_arch(
            student.arch,
            **overrides,
            img_size=img_size,
            patch_size=student.patch_size,
            ffn_layer=student.ffn_layer,
            mlp_ratio=student.mlp_ratio,
            layerscale=student.layerscale,
            drop_path_rate=student.drop_path_rate if drop_path else 0.0,
            drop_path_uniform=student.drop_path_uniform,
            qkv_bias=student.qkv_bias,
            proj_bias=student.proj_bias,
            ffn_bias=student.ffn_bias,
            num_register_tokens=student.num_register_tokens,
            interpolate_offset=student.interpolate_offset,
            interpolate_antialias=student.interpolate_antialias,
            layer_norm_eps=student.layer_norm_eps,
            position_encoding=student.position_encoding,
            rope_base=student.rope_base,
            rope_normalize_coords=student.rope_normalize_coords,
        )


def _check_names(values: dict, where: str, error: type[Exception]) -> None:
    unknown = sorted(set(values) - set(ViTConfig.field_names()))
    if unknown:
        raise error(
            f"unknown ViT field(s) {unknown} in {where}; a ViTConfig has {sorted(ViTConfig.field_names())} "
            f"(and {ARCH_KEY!r} in stored dicts): remove or rename them"
        )


def stored_input_decoding(stored: dict | None, source: str = "a stored backbone config") -> dict | None:
    """The ``input_decoding`` of a stored backbone config: ``{"alpha_background": colour name or "#rrggbb",
    "image_max_value": 0 (each image by its own range) or the declared maximum}`` (the ``train.*`` keys of the same
    names), or None for files written before it was stored. Its values are parsed where images are decoded
    (``franca.data.image_decoding.ImageDecoding.from_record``)."""
    if not isinstance(stored, dict) or stored.get(INPUT_DECODING_KEY) is None:
        return None
    decoding = stored[INPUT_DECODING_KEY]
    if not isinstance(decoding, dict) or set(decoding) - set(INPUT_DECODING_FIELDS):
        raise ValueError(
            f"{INPUT_DECODING_KEY}={decoding!r} in {source} must be a dict with the keys "
            f"{list(INPUT_DECODING_FIELDS)}; rewrite the file with a current franca export, or remove the entry to "
            "decode with the defaults"
        )
    return dict(decoding)
