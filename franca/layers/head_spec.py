"""The shape of a DINO / iBOT head read off its weights, so a distillation student gets heads shaped like its
teacher's (training.md, "Distil").

Every size of :func:`franca.layers.heads.build_head` is in the tensor shapes of a head's state dict: the Matryoshka
levels' widths (``matryoshka_projections.{l}.weight`` [d_l, d_in]; d_in = d_l for ``slice`` inputs, the full width
for ``project``), the MLP's hidden and bottleneck widths and depth (``mlps.{l}.{i}.weight``, ``mlp.{i}.weight``) and
each level's prototype count (``last_layers.{l}.weight_g`` [K_l, 1]). Only two switches are not: ``l2_norm`` (a GELU
or an L2 norm after the bottleneck; no parameter) and the initialisation; the caller supplies them.

:meth:`HeadSpec.for_width` gives the same head for another backbone width: nesting widths scaled by the width ratio,
the same prototypes per level, the same MLP. A student's level l then predicts the teacher's level-l targets.
"""

import re
from dataclasses import dataclass, replace

import torch
from torch import nn

from franca.layers.heads import build_head

_LINEAR = re.compile(r"^(?:mlps\.0|mlp)\.(\d+)\.weight$")


@dataclass(frozen=True)
class HeadSpec:
    """The arguments of :func:`build_head` a head's weights fix (``l2_norm`` and ``init`` are given when building)."""

    kind: str
    in_dim: int
    out_dim: int
    hidden_dim: int
    bottleneck_dim: int
    nlayers: int
    nesting_list: tuple[int, ...] | None = None
    input_mode: str = "slice"

    @property
    def prototypes(self) -> list[int]:
        """Prototypes per level (one entry for a DINOv2 head)."""
        if self.nesting_list is None:
            return [self.out_dim]
        return [int(self.out_dim * d / self.in_dim) for d in self.nesting_list]

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], in_dim: int, source: str = "the head") -> "HeadSpec":
        """The spec of a head's state dict (keys without the ``dino_head.`` / ``ibot_head.`` prefix) on a backbone of
        width ``in_dim``."""
        matryoshka = "last_layers.0.weight_g" in state
        if not matryoshka and "last_layer.weight_g" not in state:
            raise ValueError(
                f"{source} is neither a Matryoshka head (last_layers.0.weight_g) nor a DINO head "
                f"(last_layer.weight_g); its keys start with {sorted(state)[:4]}"
            )
        linears = sorted(int(m.group(1)) for key in state if (m := _LINEAR.match(key)))
        prefix = "mlps.0" if matryoshka else "mlp"
        hidden = state[f"{prefix}.0.weight"].shape[0] if len(linears) > 1 else 1
        if not matryoshka:
            bottleneck = state["last_layer.weight_v"].shape[1]
            out_dim = state["last_layer.weight_g"].shape[0]
            return cls("dino", in_dim, out_dim, hidden, bottleneck, len(linears))
        levels = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("last_layers."))
        projections = [state[f"matryoshka_projections.{level}.weight"].shape for level in range(levels)]
        nesting = tuple(shape[0] for shape in projections)
        input_mode = "project" if levels > 1 and projections[0][1] == in_dim else "slice"
        prototypes = [state[f"last_layers.{level}.weight_g"].shape[0] for level in range(levels)]
        bottleneck = state["last_layers.0.weight_v"].shape[1]
        out_dim = _total_prototypes(prototypes, nesting, in_dim, source)
        return cls("matryoshka", in_dim, out_dim, hidden, bottleneck, len(linears), nesting, input_mode)

    def for_width(self, width: int) -> "HeadSpec":
        """The same head on a backbone of ``width``: nesting widths × width / in_dim, the same prototypes per level."""
        if self.nesting_list is None:
            return replace(self, in_dim=width)
        scaled = tuple(d * width // self.in_dim for d in self.nesting_list)
        if any(d * width % self.in_dim for d in self.nesting_list) or min(scaled) < 1:
            raise ValueError(
                f"the teacher's Matryoshka widths {list(self.nesting_list)} (of {self.in_dim}) do not scale to a "
                f"student of width {width}; give the student a width that divides them evenly, e.g. "
                f"{self.in_dim // 2} or {self.in_dim // 4}"
            )
        return replace(self, in_dim=width, nesting_list=scaled)

    def build(self, l2_norm: bool, init: str = "fan_in") -> nn.Module:
        nesting = None if self.nesting_list is None else list(self.nesting_list)
        return build_head(
            self.kind,
            self.in_dim,
            self.out_dim,
            self.hidden_dim,
            self.bottleneck_dim,
            self.nlayers,
            nesting_list=nesting,
            input_mode=self.input_mode,
            l2_norm=l2_norm,
            init=init,
        )

    def describe(self) -> str:
        levels = "" if self.nesting_list is None else f", levels {list(self.nesting_list)}"
        return f"{self.kind} head, prototypes {self.prototypes}{levels}, MLP {self.nlayers} x {self.hidden_dim}"


def _total_prototypes(prototypes: list[int], nesting: tuple[int, ...], in_dim: int, source: str) -> int:
    """The ``out_dim`` K of :class:`MatryoshkaHead` whose levels get int(K · d_l / in_dim) = ``prototypes``."""
    last = prototypes[-1]
    start = last * in_dim // nesting[-1]
    for total in range(max(1, start - 1), start + in_dim // nesting[-1] + 2):
        if [int(total * d / in_dim) for d in nesting] == prototypes:
            return total
    raise ValueError(
        f"{source}: prototypes per level {prototypes} for widths {list(nesting)} of {in_dim} do not come from one "
        "prototype count K (K_l = int(K * d_l / width)); it was not written by franca's MatryoshkaHead"
    )
