"""``parallelize``: activation checkpointing, ``torch.compile`` and data parallelism for the meta-architecture.

Applied in this order, each behind its own ``compute_precision`` switch and each a small function usable alone
(the torchtitan recipe):

1. activation checkpointing of every student block (``activation_checkpointing``): recompute a block's activations in
   the backward pass instead of storing them;
2. ``torch.compile`` of every block, student and teacher (``compile``: auto = on CUDA only, where the design notes
   measured +30 % throughput; on CPU compiling costs more than it saves);
3. data parallelism (``distributed``): FSDP2 (``fully_shard``) per block, then per module (backbone, dino_head,
   ibot_head) for the student and the teacher (always resharded after its forward), with the per-module
   ``MixedPrecisionPolicy`` and sharding strategy of ``compute_precision.{student,teacher}.<module>``; or replicated
   student modules (DDP semantics through ``replicate``, the FSDP2-based composable DDP) for models too small to
   shard. The teacher is never replicated: it only gets EMA updates, identical on every rank.

None of them renames a parameter (no ``_orig_mod.`` or ``_checkpoint_wrapped_module.`` prefixes), so the EMA pairing
of student and teacher, the parameter groups, the checkpoints and the release exports keep their keys.
"""

import functools
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from franca.train.runtime import Runtime

FSDP_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# FSDP1 sharding strategies of the original configs → (FSDP2 reshard_after_forward, hybrid: shard within a node only).
# The config schema allows exactly these (franca.train.config.CHOICES); FSDP1's NO_SHARD is
# compute_precision.distributed=ddp.
SHARDING_STRATEGIES = {
    "FULL_SHARD": (True, False),
    "SHARD_GRAD_OP": (False, False),
    "HYBRID_SHARD": (True, True),
    "_HYBRID_SHARD_ZERO2": (False, True),
}


def _checkpointed_forward(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(blocks: nn.ModuleList) -> None:
    """Recompute each block's activations in backward (non-reentrant ``torch.utils.checkpoint``).

    The block's bound ``forward`` is replaced on the instance, so parameter names do not change. The RNG state is
    replayed during recomputation (the checkpoint default), so stochastic depth drops the same samples twice.
    """
    for block in blocks:
        if isinstance(block.forward, functools.partial):
            raise ValueError(f"block {type(block).__name__} already has activation checkpointing")
        block.forward = functools.partial(_checkpointed_forward, block.forward)


def apply_compile(blocks: nn.ModuleList) -> None:
    """``torch.compile`` each block in place (``nn.Module.compile``: parameter names unchanged)."""
    for block in blocks:
        block.compile(dynamic=False)


def mixed_precision_policy(precision_cfg: DictConfig, enabled: bool = True):
    """FSDP2 ``MixedPrecisionPolicy`` from a ``{param_dtype, reduce_dtype, buffer_dtype}`` config node.

    FSDP2 keeps buffers in their own dtype (fp32 here), so ``buffer_dtype`` must be fp32. With ``enabled=False``
    (``compute_precision.dtype`` resolved to fp32) everything stays fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not enabled:
        return MixedPrecisionPolicy()
    if precision_cfg.buffer_dtype != "fp32":
        raise ValueError(
            f"mixed_precision.buffer_dtype={precision_cfg.buffer_dtype!r}: FSDP2 keeps buffers in fp32; set it to fp32"
        )
    return MixedPrecisionPolicy(
        param_dtype=FSDP_DTYPES[precision_cfg.param_dtype], reduce_dtype=FSDP_DTYPES[precision_cfg.reduce_dtype]
    )


def build_device_mesh(device: torch.device, world_size: int, local_world_size: int, hybrid: bool):
    """A 1-D mesh over all ranks, or for hybrid sharding a 2-D (replicate across nodes, shard within a node) mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    if not hybrid:
        return init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))
    if world_size % local_world_size:
        raise ValueError(
            f"hybrid sharding needs the same number of processes per node: world size {world_size} is not a "
            f"multiple of {local_world_size} processes per node"
        )
    shape = (world_size // local_world_size, local_world_size)
    return init_device_mesh(device.type, shape, mesh_dim_names=("replicate", "shard"))


def fully_shard_module(module: nn.Module, mesh, reshard_after_forward: bool, mp_policy) -> None:
    """FSDP2 on each transformer block (if ``module`` has ``blocks``), then on the module itself."""
    from torch.distributed.fsdp import fully_shard

    for block in getattr(module, "blocks", ()):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy)
    fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy)


def apply_fsdp(
    models: nn.ModuleDict,
    precision_cfg: DictConfig,
    device: torch.device,
    world_size: int,
    local_world_size: int,
    mixed_precision: bool,
    always_reshard: bool = False,
) -> None:
    """Shard every module of ``models`` (student or teacher) with its own strategy and precision policy.

    ``always_reshard`` (the teacher) frees the gathered parameters after every forward whatever the strategy: the
    teacher has no backward to reshard it, and its EMA update writes the shards, so gathered copies would go stale.
    """
    meshes = {}
    for name, module in models.items():
        module_cfg = precision_cfg[name]
        strategy = module_cfg.sharding_strategy
        if strategy not in SHARDING_STRATEGIES:
            raise ValueError(
                f"sharding_strategy={strategy!r} of {name} has no FSDP2 equivalent; use one of "
                f"{', '.join(SHARDING_STRATEGIES)} (or compute_precision.distributed=ddp for no sharding)"
            )
        reshard, hybrid = SHARDING_STRATEGIES[strategy]
        reshard = reshard or always_reshard
        if hybrid not in meshes:
            meshes[hybrid] = build_device_mesh(device, world_size, local_world_size, hybrid)
        policy = mixed_precision_policy(module_cfg.mixed_precision, enabled=mixed_precision)
        fully_shard_module(module, meshes[hybrid], reshard, policy)


def apply_replicate(models: nn.ModuleDict, device: torch.device, world_size: int) -> None:
    """DDP semantics (gradients averaged over ranks, parameters replicated) for each module, names unchanged."""
    from torch.distributed._composable.replicate_with_fsdp import replicate
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("replicate",))
    for module in models.values():
        replicate(module, mesh=mesh)


def parallelize(
    model: nn.Module, cfg: DictConfig, runtime: "Runtime", world_size: int, local_world_size: int | None = None
) -> str:
    """Apply activation checkpointing, compile and data parallelism to an :class:`SSLMetaArch` in place.

    ``runtime`` holds the resolved compile switch, data-parallel mode and autocast dtype (``franca.train.runtime``).
    Call it after the model is on ``runtime.device`` (and initialised or loaded identically on every rank) and before
    the optimizer is built. Returns the data-parallel mode used: "fsdp", "ddp" or "none".
    """
    precision = cfg.compute_precision
    mode, device = runtime.data_parallel, runtime.device
    if mode != "none" and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"compute_precision.distributed={mode} needs an initialised process group: call "
            "franca.distributed.init_distributed() first"
        )
    if precision.activation_checkpointing:
        apply_activation_checkpointing(model.student["backbone"].blocks)
    if runtime.compile:
        for models in (model.student, model.teacher):
            apply_compile(models["backbone"].blocks)
    mixed = runtime.autocast_dtype is not None
    if mode == "fsdp":
        local = local_world_size or world_size
        apply_fsdp(model.student, precision.student, device, world_size, local, mixed)
        apply_fsdp(model.teacher, precision.teacher, device, world_size, local, mixed, always_reshard=True)
    elif mode == "ddp":
        apply_replicate(model.student, device, world_size)
    return mode
