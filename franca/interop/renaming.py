"""Key maps between our flat backbone state dict and another library's, in both directions.

A :class:`KeyMap` renames whole-model tensors (``top``) and per-block tensors (``block``: the key after
``blocks.{i}.`` on our side, after ``<block_prefix>{i}.`` on theirs). Tensors that one side stores fused and the other
split (``attn.qkv`` vs query/key/value, SwiGLU's packed ``w12`` vs gate/up) are first cut into named row blocks with
:func:`split_rows` and put back with :func:`join_rows`, so the maps themselves stay one-to-one renames.
"""

import re
from dataclasses import dataclass

import torch

from franca.models.config import ViTConfig

_OUR_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


class ForeignFormatError(ValueError):
    """A folder or state dict in another library's layout that franca cannot represent or does not recognise."""


@dataclass(frozen=True)
class KeyMap:
    top: dict[str, str]
    block: dict[str, str]
    block_prefix: str

    def to_theirs(self, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our keys → theirs; a key the map does not know is a ForeignFormatError (nothing is dropped silently)."""
        out, unknown = {}, []
        for key, tensor in ours.items():
            match = _OUR_BLOCK.match(key)
            if key in self.top:
                out[self.top[key]] = tensor
            elif match and match.group(2) in self.block:
                out[f"{self.block_prefix}{match.group(1)}.{self.block[match.group(2)]}"] = tensor
            else:
                unknown.append(key)
        if unknown:
            raise ForeignFormatError(f"no {self.block_prefix!r}-layout name for our keys {unknown[:6]}")
        return out

    def to_ours(self, theirs: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """Their keys → ours; keys of anything else (a classifier head, another architecture) are refused."""
        top = {their: our for our, their in self.top.items()}
        block = {their: our for our, their in self.block.items()}
        pattern = re.compile(rf"^{re.escape(self.block_prefix)}(\d+)\.(.+)$")
        out, unknown = {}, []
        for key, tensor in theirs.items():
            match = pattern.match(key)
            if key in top:
                out[top[key]] = tensor
            elif match and match.group(2) in block:
                out[f"blocks.{match.group(1)}.{block[match.group(2)]}"] = tensor
            else:
                unknown.append(key)
        if unknown:
            raise ForeignFormatError(
                f"{source} holds tensors this backbone layout does not have: {sorted(unknown)[:6]}"
                f"{' …' if len(unknown) > 6 else ''}; it is another architecture (or a model with a task head): "
                "export its backbone alone"
            )
        return out


def block_indices(state: dict[str, torch.Tensor]) -> list[int]:
    return sorted({int(m.group(1)) for key in state if (m := _OUR_BLOCK.match(key))})


def split_rows(state: dict[str, torch.Tensor], fused: str, parts: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Each ``blocks.{i}.<fused>`` cut along its first axis into equal ``blocks.{i}.<part>`` tensors."""
    out = {}
    for key, tensor in state.items():
        match = _OUR_BLOCK.match(key)
        if match and match.group(2) == fused:
            for part, piece in zip(parts, tensor.chunk(len(parts), dim=0), strict=True):
                out[f"blocks.{match.group(1)}.{part}"] = piece
        else:
            out[key] = tensor
    return out


def join_rows(state: dict[str, torch.Tensor], parts: tuple[str, ...], fused: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`split_rows`: ``blocks.{i}.<part>`` stacked along the first axis into ``<fused>``. A part
    missing while others are present is zeros (the bias a library leaves out, e.g. DINOv3's key bias)."""
    out = dict(state)
    for i in block_indices(state):
        names = [f"blocks.{i}.{part}" for part in parts]
        present = [state[name] for name in names if name in state]
        if not present:
            continue
        pieces = [state.get(name, torch.zeros_like(present[0])) for name in names]
        for name in names:
            out.pop(name, None)
        out[f"blocks.{i}.{fused}"] = torch.cat(pieces, dim=0)
    return out


def split_parameters(state: dict[str, torch.Tensor], fused: str, parts: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """:func:`split_rows` of ``<fused>.weight`` and ``<fused>.bias`` into ``<part>.weight`` / ``<part>.bias``."""
    for kind in ("weight", "bias"):
        state = split_rows(state, f"{fused}.{kind}", tuple(f"{part}.{kind}" for part in parts))
    return state


def join_parameters(state: dict[str, torch.Tensor], parts: tuple[str, ...], fused: str) -> dict[str, torch.Tensor]:
    """:func:`join_rows` of ``<part>.weight`` / ``<part>.bias`` into ``<fused>.weight`` and ``<fused>.bias``."""
    for kind in ("weight", "bias"):
        state = join_rows(state, tuple(f"{part}.{kind}" for part in parts), f"{fused}.{kind}")
    return state


# Parameters a library layout always has although our ViT may leave them out: suffix -> (the ViTConfig field that
# leaves it out, the value that makes it a no-op, the tensor whose rows give its length).
_FILLERS = {
    "attn.proj.bias": ("proj_bias", 0.0, "attn.proj.weight"),
    "ls1.gamma": ("layerscale", 1.0, "norm1.weight"),
    "ls2.gamma": ("layerscale", 1.0, "norm2.weight"),
    "mlp.fc1.bias": ("ffn_bias", 0.0, "mlp.fc1.weight"),
    "mlp.fc2.bias": ("ffn_bias", 0.0, "mlp.fc2.weight"),
    "mlp.w12.bias": ("ffn_bias", 0.0, "mlp.w12.weight"),
    "mlp.w3.bias": ("ffn_bias", 0.0, "mlp.w3.weight"),
}


def _omitted(config: ViTConfig) -> dict[str, tuple[str, float, str]]:
    return {suffix: spec for suffix, spec in _FILLERS.items() if not getattr(config, spec[0])}


def complete_for_export(state: dict[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """``state`` plus the no-op tensors (zero biases, unit LayerScale) a library layout has but ``config`` omits."""
    out = dict(state)
    for i in block_indices(state):
        for suffix, (_, value, rows_of) in _omitted(config).items():
            reference = state.get(f"blocks.{i}.{rows_of}")
            if reference is not None:
                out[f"blocks.{i}.{suffix}"] = torch.full(reference.shape[:1], value, dtype=reference.dtype)
    return out


def drop_fillers(state: dict[str, torch.Tensor], config: ViTConfig, source: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`complete_for_export` for a folder we exported: the no-op tensors removed again; one that
    is no longer a no-op (the folder's weights were changed) is refused, since ``config`` cannot hold it."""
    out = dict(state)
    for i in block_indices(state):
        for suffix, (field, value, _) in _omitted(config).items():
            key = f"blocks.{i}.{suffix}"
            tensor = out.pop(key, None)
            if tensor is not None and not torch.all(tensor == value):
                raise ForeignFormatError(
                    f"{source}: {key} is not {value} everywhere, but the folder's franca_config.json says "
                    f"{field}={getattr(config, field)}; delete franca_config.json to load the folder as its "
                    "library describes it"
                )
    return out
