"""Optimizer parameter groups: layer-wise lr decay, patch-embedding lr, weight-decay exemptions
(valeoai/Franca ``franca/utils/``, ``get_params_groups_with_decay``).

Each trainable parameter of one student submodule (backbone, DINO head or iBOT head) gets an ``lr_multiplier``, a
``wd_multiplier`` and ``is_last_layer`` / ``is_backbone`` flags; parameters that share all four are fused into one
optimizer group. Every iteration :func:`apply_optim_schedule` sets each group's lr and weight decay from the schedules
(the backbone's lr also scaled by the stage schedule of ``train.freeze_backbone_iterations``).
"""

from collections.abc import Iterable

import torch
from torch import nn

from franca.utils.names import unwrapped_name

# Backbone parameters in front of the first block (layer 0).
_EMBEDDING_NAMES = frozenset({"pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens"})


def canonical_name(name: str) -> str:
    """``name`` without wrapper components and without a leading ``backbone.``."""
    parts = unwrapped_name(name).split(".")
    if parts and parts[0] == "backbone":
        parts = parts[1:]
    return ".".join(parts)


def _block_index(parts: list[str]) -> int | None:
    """Global block index of ``blocks.{i}.…`` (flat) or ``blocks.{c}.{i}.…`` (chunked), else None."""
    if len(parts) < 2 or parts[0] != "blocks" or not parts[1].isdigit():
        return None
    if len(parts) > 2 and parts[2].isdigit():
        return int(parts[2])
    return int(parts[1])


def _layer_id(parts: list[str], n_blocks: int) -> int:
    """0 for the embeddings, i + 1 for block i, n_blocks + 1 for everything else (final norm, head layers)."""
    if parts[0] in _EMBEDDING_NAMES:
        return 0
    block = _block_index(parts)
    return n_blocks + 1 if block is None else block + 1


def _count_blocks(module: nn.Module) -> int:
    indices = [_block_index(canonical_name(name).split(".")) for name, _ in module.named_parameters()]
    return max((i for i in indices if i is not None), default=-1) + 1


def get_params_groups(
    module: nn.Module,
    layerwise_decay: float = 1.0,
    patch_embed_lr_mult: float = 0.2,
    n_blocks: int | None = None,
    is_backbone: bool = False,
) -> list[dict]:
    """One dict per trainable parameter: ``params``, ``name``, ``lr_multiplier``, ``wd_multiplier``,
    ``is_last_layer`` and ``is_backbone`` (as given: the module is the backbone).

    lr multiplier = ``layerwise_decay ** (n_blocks + 1 − layer_id)`` (× ``patch_embed_lr_mult`` under
    ``patch_embed.``); a module without blocks (a head) gets 1. ``n_blocks`` defaults to the number of blocks found
    in the parameter names. Weight decay is off (multiplier 0) for biases, norms and LayerScale ``gamma``.
    """
    if n_blocks is None:
        n_blocks = _count_blocks(module)
    groups = []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        canonical = canonical_name(name)
        parts = canonical.split(".")
        lr_multiplier = layerwise_decay ** (n_blocks + 1 - _layer_id(parts, n_blocks))
        if "patch_embed" in parts:
            lr_multiplier *= patch_embed_lr_mult
        no_decay = parts[-1] == "bias" or "norm" in canonical or "gamma" in canonical
        groups.append(
            {
                "params": param,
                "name": name,
                "lr_multiplier": lr_multiplier,
                "wd_multiplier": 0.0 if no_decay else 1.0,
                "is_last_layer": "last_layer" in canonical,
                "is_backbone": is_backbone,
            }
        )
    return groups


def fuse_params_groups(groups: Iterable[dict]) -> list[dict]:
    """Merge per-parameter dicts with equal (lr_multiplier, wd_multiplier, is_last_layer, is_backbone) into optimizer
    groups.

    Each group: ``params`` (list), ``names`` (list), ``lr_multiplier``, ``wd_multiplier``, ``is_last_layer``,
    ``is_backbone``; groups are ordered by first appearance.
    """
    fused: dict[tuple, dict] = {}
    for group in groups:
        key = (group["lr_multiplier"], group["wd_multiplier"], group["is_last_layer"], group.get("is_backbone", False))
        if key not in fused:
            fused[key] = {
                "params": [],
                "names": [],
                "lr_multiplier": key[0],
                "wd_multiplier": key[1],
                "is_last_layer": key[2],
                "is_backbone": key[3],
            }
        fused[key]["params"].append(group["params"])
        fused[key]["names"].append(group["name"])
    return list(fused.values())


def apply_optim_schedule(
    optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float, backbone_lr_scale: float = 1.0
) -> None:
    """Set each group's lr = (last_layer_lr if is_last_layer else lr) · lr_multiplier (· ``backbone_lr_scale`` for
    the backbone's groups) and weight_decay = wd · wd_multiplier, each iteration (as valeoai/Franca
    ``franca/train/train.py``, ``do_train``; the backbone scale is ours, docs/deviations.md)."""
    for index, group in enumerate(optimizer.param_groups):
        missing = {"lr_multiplier", "wd_multiplier", "is_last_layer"} - group.keys()
        if missing:
            raise ValueError(
                f"optimizer param group {index} lacks {sorted(missing)}; build the optimizer from "
                "fuse_params_groups(get_params_groups(...))"
            )
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]
        if group.get("is_backbone"):
            group["lr"] *= backbone_lr_scale
        group["weight_decay"] = wd * group["wd_multiplier"]
