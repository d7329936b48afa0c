"""Projection heads that turn a backbone feature into prototype logits: DINOv2's head and Franca's Matryoshka head.

Both return a list with one logits tensor per nesting level (the plain head is a single level), so the
meta-architecture, the losses and the Sinkhorn-Knopp targets treat them alike. Paper arXiv 2507.14137, Sec. 3;
valeoai/Franca ``franca/layers/mrl_dino_head.py``, ``MRLDINOHead``.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

HEAD_KINDS = ("dino", "matryoshka")
INPUT_MODES = ("slice", "project")


class WeightNormLinear(nn.Module):
    """A bias-free Linear whose weight is ``weight_g * weight_v / ‖weight_v‖`` row by row (Salimans & Kingma).

    Written out rather than using ``torch.nn.utils`` so the state-dict names are the original's ``weight_g`` [K, 1]
    and ``weight_v`` [K, in] with no adapter, and FSDP / compile see two plain parameters. As in DINOv2 the
    direction ``weight_v`` keeps PyTorch's default Linear init and the gain ``weight_g`` is 1.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.empty(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        nn.init.ones_(self.weight_g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def build_mlp(
    in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int, gelu_after_bottleneck: bool
) -> nn.Module:
    """Linear(in→hidden), GELU, (nlayers−2)×[Linear(hidden→hidden), GELU], Linear(hidden→bottleneck) [, GELU].

    With nlayers=3 the Linear layers are at indices 0, 2, 4 as in the released checkpoints. Franca's Matryoshka
    branches end with a GELU after the bottleneck, DINOv2's head does not (original ``MRLDINOHead``). With nlayers=1
    the original's ``_build_mlp`` returns a bare Linear(in→bottleneck), no GELU and no Sequential (keys
    ``mlp.weight`` / ``mlps.{l}.weight``), and so do we, so its 1-layer checkpoints load.
    """
    if nlayers < 1:
        raise ValueError(f"head nlayers={nlayers} must be >= 1 (the released configs use 3)")
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim)
    dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
    layers: list[nn.Module] = []
    for index, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(d_in, d_out))
        if index < nlayers - 1 or gelu_after_bottleneck:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


HEAD_INITS = ("fan_in", "trunc_normal")


def init_linear_layers(module: nn.Module, init: str = "fan_in") -> None:
    """Truncated-normal weights and zero biases for every nn.Linear below ``module``.

    ``trunc_normal``: std 0.02 for every layer (DINOv2 ``DINOHead._init_weights``, kept by the original Franca head).
    ``fan_in``: std 1/sqrt(fan_in), truncated at ±2 std, which keeps the activations' scale through the MLP whatever
    its width: 0.022 in DINOv2's 2048-wide hidden layers, but 0.14 in the first layers of ViT-B's 48-d Matryoshka
    slice (the large recipes keep ``trunc_normal``: ``fan_in`` is measured at small scale only). In narrow heads
    (a 128-d model's 8-d Matryoshka slice, a 256-wide MLP) std 0.02 shrinks the bottleneck to ~1e-4 at
    initialisation: AdamW moves the zero-initialised biases by ~lr per step whatever that scale, so within tens of
    steps the biases set the L2-normalised bottleneck's direction, every image gets the same prediction and the
    clustering stalls at uniform targets (docs/training_dynamics.md).
    """
    if init not in HEAD_INITS:
        raise ValueError(f"head init={init!r} is unknown; choose one of {HEAD_INITS} (dino.head_init)")
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            if init == "trunc_normal":
                nn.init.trunc_normal_(layer.weight, std=0.02)  # DINOv2's call: bounds ±2 absolute, i.e. ~100 std
            else:
                std = layer.in_features**-0.5
                nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class DINOHead(nn.Module):
    """DINOv2's head: MLP → L2-normalised bottleneck → weight-normed prototypes (one level, ``last_layer``)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        init: str = "fan_in",
    ):
        super().__init__()
        self.level_dims = [in_dim]
        self.out_dims = [out_dim]
        self.init = init
        self.mlp = build_mlp(in_dim, hidden_dim, bottleneck_dim, nlayers, gelu_after_bottleneck=False)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_linear_layers(self.mlp, self.init)
        self.last_layer.reset_parameters()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.last_layer(l2_normalize(self.mlp(x)))]


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Unit-norm rows before the prototype layer (DINOv2's head); eps safe for fp16."""
    return F.normalize(x, p=2, dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)


def default_nesting_list(in_dim: int) -> list[int]:
    """Franca's nesting dims [D/16, D/8, D/4, D/2, D] (original ``SSLMetaArch.__init__``), e.g.
    [48, 96, 192, 384, 768] for ViT-B."""
    return [in_dim // 16, in_dim // 8, in_dim // 4, in_dim // 2, in_dim]


def check_nesting_list(nesting_list: list[int], in_dim: int) -> None:
    if not nesting_list or any(d < 1 or d > in_dim for d in nesting_list):
        raise ValueError(f"nesting_list={nesting_list} must be non-empty with every dim in [1, in_dim={in_dim}]")
    if any(a >= b for a, b in zip(nesting_list[:-1], nesting_list[1:], strict=True)):
        raise ValueError(f"nesting_list={nesting_list} must be strictly increasing (e.g. [48, 96, 192, 384, 768])")


class MatryoshkaHead(nn.Module):
    """Franca's nested (Matryoshka) head: one independent branch per nesting level l (original ``MRLDINOHead``).

    Branch l reads ``x[..., :d_l]`` (``input_mode="slice"``, the paper and release v1.1) or all of x
    (``"project"``, release v1.0.0), applies ``matryoshka_projections.{l}`` → d_l, ``mlps.{l}`` (GELU after the
    bottleneck too) and the weight-normed ``last_layers.{l}`` with K_l = int(K·d_l/D) prototypes, as the original.
    ``l2_norm=True`` makes each level a DINOv2 head instead: no GELU after the bottleneck, and the bottleneck
    L2-normalised before the prototypes. The original form starts with logits that scale with the width (std ~1e-4 for
    a D=128 head) and can collapse to exactly uniform predictions (a bottleneck driven into GELU's flat negative side
    gives zero logits, zero gradient); the DINOv2 form gives every level cosine logits. ``forward`` returns one [*, K_l]
    tensor per level.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 384,
        nlayers: int = 3,
        nesting_list: list[int] | None = None,
        input_mode: str = "slice",
        l2_norm: bool = False,
        init: str = "fan_in",
    ):
        super().__init__()
        if input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode={input_mode!r} is unknown; choose one of {INPUT_MODES}")
        nesting_list = list(nesting_list) if nesting_list is not None else default_nesting_list(in_dim)
        check_nesting_list(nesting_list, in_dim)
        out_dims = [int(out_dim * d / in_dim) for d in nesting_list]
        if min(out_dims) < 1:
            raise ValueError(
                f"out_dim={out_dim} gives {out_dims} prototypes for nesting_list={nesting_list}; "
                f"raise out_dim to at least {math.ceil(in_dim / nesting_list[0])}"
            )
        self.in_dim = in_dim
        self.input_mode = input_mode
        self.l2_norm = l2_norm
        self.init = init
        self.level_dims = nesting_list
        self.out_dims = out_dims
        projection_in = {"slice": nesting_list, "project": [in_dim] * len(nesting_list)}[input_mode]
        self.matryoshka_projections = nn.ModuleList(
            nn.Linear(d_in, d) for d_in, d in zip(projection_in, nesting_list, strict=True)
        )
        self.mlps = nn.ModuleList(
            build_mlp(d, hidden_dim, bottleneck_dim, nlayers, gelu_after_bottleneck=not l2_norm) for d in nesting_list
        )
        self.last_layers = nn.ModuleList(WeightNormLinear(bottleneck_dim, k) for k in out_dims)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_linear_layers(self.matryoshka_projections, self.init)
        init_linear_layers(self.mlps, self.init)
        for last_layer in self.last_layers:
            last_layer.reset_parameters()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for d, projection, mlp, last_layer in zip(
            self.level_dims, self.matryoshka_projections, self.mlps, self.last_layers, strict=True
        ):
            branch_input = x[..., :d] if self.input_mode == "slice" else x
            bottleneck = mlp(projection(branch_input))
            outputs.append(last_layer(l2_normalize(bottleneck) if self.l2_norm else bottleneck))
        return outputs


def build_head(
    kind: str,
    in_dim: int,
    out_dim: int,
    hidden_dim: int,
    bottleneck_dim: int,
    nlayers: int,
    nesting_list: list[int] | None = None,
    input_mode: str = "slice",
    l2_norm: bool = False,
    init: str = "fan_in",
) -> DINOHead | MatryoshkaHead:
    """Build a ``"dino"`` (DINOv2 baseline) or ``"matryoshka"`` (Franca) head from config values."""
    if kind == "dino":
        if nesting_list is not None:
            raise ValueError(f"nesting_list={nesting_list} applies to matryoshka heads only; set it to null for dino")
        return DINOHead(in_dim, out_dim, hidden_dim, bottleneck_dim, nlayers, init)
    if kind == "matryoshka":
        return MatryoshkaHead(
            in_dim, out_dim, hidden_dim, bottleneck_dim, nlayers, nesting_list, input_mode, l2_norm, init
        )
    raise ValueError(f"head kind={kind!r} is unknown; choose one of {HEAD_KINDS}")
