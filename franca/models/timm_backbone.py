"""A timm model as a franca backbone: the same ``forward_features`` dictionary as our ViT, so that distillation,
every evaluation command and the exports run on it unchanged (``student.arch=timm:<name>``, training.md "Distil").

:class:`TimmBackbone` = timm trunk (random initialisation, no classifier, no pooling) → its last feature map
[B, C, h, w] → a learned linear map C → ``embed_dim`` at every position (the teacher's width in distillation) →
tokens [B, h·w, D]. The "CLS" row is the mean of those tokens (global average pooling), and a LayerNorm over
[pooled; tokens] gives ``x_norm_clstoken``, ``x_norm_patchtokens``, ``x_prenorm`` like the ViT; there are no register
tokens (``x_norm_regtokens`` is [B, 0, D]) and no mask tokens (a CNN has no token to replace).

``patch_size`` is the trunk's stride: an input of H × W multiple of it gives an (H/P) × (W/P) token grid, which is
what the dense evaluations and the iBOT masks assume. A trunk whose own stride differs is rebuilt with timm's
``output_stride`` (ResNets accept 8, 16 and 32: dilated instead of strided last stages), so a 32 px image can give a
4 × 4 grid. The stored config (:meth:`TimmBackbone.build_config`: ``{"timm": name, ...}``) is what release files and
safetensors folders keep beside the weights; :func:`franca.hub.load_backbone` rebuilds the model from it.
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from franca.models.config import INPUT_DECODING_KEY
from franca.models.vision_transformer import DinoVisionTransformer

TIMM_PREFIX = "timm:"
TIMM_CONFIG_KEY = "timm"
INSTALL_HINT = "pip install 'franca[timm]'"


def is_timm_arch(arch: str) -> bool:
    """Whether ``student.arch`` names a timm model (``timm:<name>``)."""
    return str(arch).startswith(TIMM_PREFIX)


def is_timm_config(stored) -> bool:
    """Whether a stored backbone config describes a :class:`TimmBackbone`."""
    return isinstance(stored, dict) and TIMM_CONFIG_KEY in stored


def _timm():
    try:
        import timm
    except ImportError as err:
        raise ImportError(f"a timm backbone (student.arch=timm:<name>) needs the timm package: {INSTALL_HINT}") from err
    return timm


@dataclass(frozen=True)
class TimmConfig:
    """What rebuilds a :class:`TimmBackbone`: the timm model name, the token width, the stride (``patch_size``), the
    training image size and the ``output_stride`` passed to timm (None: the model's own)."""

    timm: str
    embed_dim: int
    patch_size: int
    img_size: int
    output_stride: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def label(self) -> str:
        """A short name for messages (as ``ViTConfig.label``): ``timm:resnet18/8``."""
        return f"timm:{self.timm}/{self.patch_size}"

    @classmethod
    def from_dict(cls, stored: dict, source: str = "a stored timm backbone config") -> "TimmConfig":
        names = {f.name for f in fields(cls)}
        stored = {key: value for key, value in stored.items() if key != INPUT_DECODING_KEY}
        unknown = sorted(set(stored) - names)
        if unknown:
            raise ValueError(f"{source} has unknown keys {unknown}; a timm backbone config has {sorted(names)}")
        return cls(**stored)


def create_trunk(name: str, output_stride: int | None = None) -> nn.Module:
    """The timm model ``name`` without classifier and pooling, randomly initialised (nothing is downloaded)."""
    timm = _timm()
    kwargs = {} if output_stride is None else {"output_stride": output_stride}
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5]
        raise ValueError(
            f"timm has no model {name!r} (student.arch=timm:{name}); e.g. {close or ['resnet18', 'resnet50']}"
        )
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, global_pool="", **kwargs)
    except (TypeError, AssertionError, ValueError) as err:  # timm's ResNets assert the stride, others take none
        raise ValueError(
            f"timm model {name!r} cannot be built with output_stride={output_stride} ({err!r}); set student.patch_size "
            "to the model's own stride (e.g. 32), or pick a model that takes output_stride (ResNets: 8, 16, 32)"
        ) from err


@torch.no_grad()
def trunk_stride(trunk: nn.Module, img_size: int) -> int:
    """The stride of the trunk's last feature map, measured on a blank ``img_size`` image in eval mode (no batch-norm
    statistics change)."""
    was_training = trunk.training
    trunk.eval()
    try:
        height = trunk.forward_features(torch.zeros(1, 3, img_size, img_size)).shape[-2]
    finally:
        trunk.train(was_training)
    if img_size % height:
        raise ValueError(f"the timm trunk maps {img_size} px to {height} rows, not a whole stride; use another size")
    return img_size // height


class FeatureMap(nn.Module):
    """The trunk's last feature map as its ``forward`` (so activation checkpointing and compile, which wrap
    ``forward``, reach it)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


class TimmBackbone(nn.Module):
    """A timm trunk with a linear map to ``embed_dim`` and our ``forward_features`` dictionary (module docstring)."""

    def __init__(self, config: TimmConfig):
        super().__init__()
        self.config = config
        model = create_trunk(config.timm, config.output_stride)
        self.trunk = FeatureMap(model)
        self.proj = nn.Linear(model.num_features, config.embed_dim)
        self.norm = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.embed_dim = self.num_features = config.embed_dim
        self.patch_size = config.patch_size
        self.img_size = config.img_size
        self.num_register_tokens = 0
        self.n_blocks = 1
        self.rasa_head: nn.Module | None = None
        # How image files become this model's input (franca.models.config.stored_input_decoding); None = unknown.
        self.input_decoding: dict | None = None

    @classmethod
    def for_stride(cls, name: str, embed_dim: int, patch_size: int, img_size: int) -> "TimmBackbone":
        """``name`` at stride ``patch_size``: its own if that is it, else rebuilt with ``output_stride``."""
        own = trunk_stride(create_trunk(name), img_size)
        config = TimmConfig(name, embed_dim, patch_size, img_size, None if own == patch_size else patch_size)
        model = cls(config)
        got = trunk_stride(model.trunk.model, img_size)
        if got != patch_size:
            raise ValueError(
                f"timm:{name} has stride {got} with output_stride={config.output_stride}, not student.patch_size="
                f"{patch_size}; set student.patch_size={own} (its own stride)"
            )
        return model

    @property
    def blocks(self) -> tuple[nn.Module]:
        """The trunk as the one "block" that activation checkpointing, compile and FSDP wrap, and that the linear
        probe counts (its depth is 1: ``--n-last-blocks 1``)."""
        return (self.trunk,)

    def _output_dict(self, x_prenorm: torch.Tensor, use_rasa_head: bool) -> dict:
        x_norm = self.norm(x_prenorm)
        out = {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1:1],
            "x_norm_patchtokens": x_norm[:, 1:],
            "x_prenorm": x_prenorm,
            "masks": None,
        }
        if use_rasa_head:
            if self.rasa_head is None:
                raise RuntimeError("forward_features(use_rasa_head=True) needs a RASA head: attach one first")
            out["patch_token_rasa"] = self.rasa_head(out["x_norm_patchtokens"])
        return out

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[pooled; projected feature map] [B, 1 + h·w, D], before the LayerNorm."""
        if x.ndim != 4 or x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(
                f"expected images [B, C, H, W] with H and W multiples of the stride {self.patch_size}, got "
                f"{tuple(x.shape)}"
            )
        patches = self.proj(self.trunk(x).flatten(2).transpose(1, 2))
        return torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1)

    def forward_features(
        self,
        x: torch.Tensor | Sequence[torch.Tensor],
        masks: torch.Tensor | None = None,
        use_rasa_head: bool = False,
    ) -> dict | list[dict]:
        """The ViT's token dictionary (module docstring); a list of batches gives a list of dicts."""
        if isinstance(x, (list, tuple)):
            return [self.forward_features(xi, masks, use_rasa_head) for xi in x]
        if masks is not None:
            raise ValueError("a timm backbone has no mask token: call forward_features without masks")
        return self._output_dict(self.tokens(x), use_rasa_head)

    def forward(self, x: torch.Tensor, is_training: bool = False, **kwargs) -> torch.Tensor | dict:
        out = self.forward_features(x, **kwargs)
        return out if is_training else out["x_norm_clstoken"]

    def build_config(self) -> dict:
        """The stored config (``backbone_config`` of release files, ``config.json`` of safetensors folders), with the
        ``input_decoding`` when known."""
        config = self.config.to_dict()
        if self.input_decoding is not None:
            config[INPUT_DECODING_KEY] = dict(self.input_decoding)
        return config

    attach_rasa_head = DinoVisionTransformer.attach_rasa_head  # it needs only embed_dim and rasa_head

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """The ViT method for the one "block" (the trunk and its linear map): ``n`` must be 1 (or [0])."""
        if n not in (1, [0], (0,)):
            raise ValueError(f"get_intermediate_layers: a timm backbone has one block; n={n!r} must be 1")
        tokens = self.tokens(x)
        if norm:
            tokens = self.norm(tokens)
        patches, cls = tokens[:, 1:], tokens[:, 0]
        if reshape:
            grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
            patches = patches.reshape(x.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous()
        return ((patches, cls),) if return_class_token else (patches,)
