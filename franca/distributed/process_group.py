"""Process-group set-up and the few collectives the trainer needs, all no-ops in one local process.

``init_distributed`` joins the process group described by the environment (NCCL on GPU, gloo on CPU) and picks this
process's device (``cuda:<local_rank>`` when CUDA is there). One local process gets no process group at all, so the
same code runs unchanged under ``python -m franca.train``, ``torchrun`` and SLURM.
"""

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from franca.distributed.environment import DistributedEnvironment, detect_environment


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_if_distributed(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce ``tensor`` in place across ranks when torch.distributed is initialised; return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=op)
    return tensor


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def local_device(env: DistributedEnvironment) -> torch.device:
    """``cuda:<local_rank>`` when CUDA is available (made the current device), else the CPU."""
    if torch.cuda.is_available():
        if env.local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {env.local_rank} has no GPU: only {torch.cuda.device_count()} visible on this node; "
                "start at most one process per GPU (torchrun --nproc-per-node / srun --ntasks-per-node)"
            )
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def init_distributed(
    env: DistributedEnvironment | None = None, timeout: timedelta = timedelta(minutes=30)
) -> tuple[DistributedEnvironment, torch.device]:
    """Detect the environment, join its process group when there is more than one process; return it and the device.

    Calling it again in a process that already joined is harmless (the existing group is kept). The rendezvous is
    ``env://`` (MASTER_ADDR/MASTER_PORT, set here from SLURM's node list): under torchrun it then uses the agent's
    store instead of opening a second server on the same port.
    """
    env = env or detect_environment()
    device = local_device(env)
    if env.is_distributed and not is_distributed():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
    return env, device


def destroy_distributed() -> None:
    global _CONTROL_GROUP
    if is_distributed():
        dist.destroy_process_group()
    _CONTROL_GROUP = None


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _collective_device() -> torch.device:
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """The mean over ranks of each value (keys in the same order on every rank); one all-reduce for all of them.

    gloo has no AVG reduction, so this sums and divides.
    """
    if not is_distributed() or not values:
        return dict(values)
    stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    stacked /= get_world_size()
    return dict(zip(values, stacked.tolist()))


_CONTROL_GROUP: dist.ProcessGroup | None = None


def _control_group() -> dist.ProcessGroup | None:
    """A gloo group for host-side flags (created collectively on first use); None = the default group is gloo.

    Agreeing on a Python flag through NCCL would put a GPU tensor and a device sync in every training step.
    """
    global _CONTROL_GROUP
    if dist.get_backend() != "nccl":
        return None
    if _CONTROL_GROUP is None:
        _CONTROL_GROUP = dist.new_group(backend="gloo")
    return _CONTROL_GROUP


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one (e.g. one rank received SIGTERM); CPU-only."""
    if not is_distributed():
        return flag
    tensor = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_control_group())
    return bool(tensor.item())


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
