"""Distributed environment detection (torchrun, SLURM, one process), process-group set-up and small collectives."""

from franca.distributed.environment import (
    DistributedEnvironment,
    detect_environment,
    expand_nodelist,
    first_host,
    port_from_job_id,
)
from franca.distributed.logging import setup_rank_output
from franca.distributed.process_group import (
    all_gather_object,
    all_reduce_mean,
    any_rank,
    barrier,
    broadcast_object,
    destroy_distributed,
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    is_main_process,
    local_device,
)

__all__ = [
    "DistributedEnvironment",
    "all_gather_object",
    "all_reduce_mean",
    "any_rank",
    "barrier",
    "broadcast_object",
    "destroy_distributed",
    "detect_environment",
    "expand_nodelist",
    "first_host",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "local_device",
    "port_from_job_id",
    "setup_rank_output",
]
