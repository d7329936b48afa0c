"""The tensors inside a nested training state (model, optimizer, RNG): by dotted name, their size on disk, and which
hold NaN or infinity. Sharded tensors (DTensors) count by their global size and are checked by their local shard."""

from collections.abc import Iterator

import torch
from torch.distributed.tensor import DTensor


def named_tensors(state, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in nested dicts, lists and tuples, with its dotted path (``optimizer.state.<fqn>.exp_avg``)."""
    if isinstance(state, torch.Tensor):
        yield prefix, state
    elif isinstance(state, dict):
        for key, value in state.items():
            yield from named_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(state, (list, tuple)):
        for index, value in enumerate(state):
            yield from named_tensors(value, f"{prefix}.{index}" if prefix else str(index))


def state_nbytes(state) -> int:
    """The bytes of every tensor in ``state`` at its global size: about what a checkpoint of it takes on disk."""
    return sum(tensor.numel() * tensor.element_size() for _, tensor in named_tensors(state))


def nonfinite_tensors(state) -> list[str]:
    """The dotted names of the floating-point tensors of ``state`` holding NaN or ±inf (this rank's shards only),
    found with one device synchronisation."""
    named = [
        (name, tensor.to_local() if isinstance(tensor, DTensor) else tensor)
        for name, tensor in named_tensors(state)
        if tensor.is_floating_point() or tensor.is_complex()
    ]
    named = [(name, tensor) for name, tensor in named if tensor.numel()]
    if not named:
        return []
    flags = [(~torch.isfinite(tensor)).any() for _, tensor in named]
    device = flags[0].device  # one device in practice; any other is moved there
    return [name for (name, _), bad in zip(named, torch.stack([f.to(device) for f in flags]).tolist()) if bad]
