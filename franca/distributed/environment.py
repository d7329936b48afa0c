"""Detection of the distributed environment: torchrun, SLURM, or one local process (the original,
valeoai/Franca ``franca/distributed/``, knew SLURM and torchrun only).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT. A SLURM task (``srun``, or
a submitit job) has SLURM_JOB_ID, SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and SLURM_JOB_NODELIST; its master is the
first node of the node list and its port comes from MASTER_PORT or, else, from the job id, so that every task of a
job agrees on it without talking. Anything else is one local process. torchrun wins when both are present (torchrun
launched inside a SLURM allocation).
"""

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Mapping

TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_KEYS = ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST")
PORT_RANGE = (20000, 60000)


@dataclass(frozen=True)
class DistributedEnvironment:
    """Where this process sits: its rank among ``world_size`` processes, its rank on its node, and the rendezvous."""

    launcher: str  # "torchrun" | "slurm" | "local"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], key: str, launcher: str) -> int:
    value = env[key]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{launcher} environment variable {key}={value!r} is not an integer") from None


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compact host list: ``"gpu[01-03,07],login1"`` → ``["gpu01", "gpu02", "gpu03", "gpu07",
    "login1"]``. Zero padding of ranges is kept; several bracket groups in one name (``a[1-2]b[3-4]``) expand as a
    product, as ``scontrol show hostnames`` does."""
    hosts: list[str] = []
    for name in _split_top_level(nodelist):
        hosts.extend(_expand_name(name))
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(nodelist):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"SLURM node list {nodelist!r} has unbalanced brackets")
    parts.append(nodelist[start:])
    return [part.strip() for part in parts if part.strip()]


def _expand_name(name: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", name)
    if match is None:
        return [name]
    prefix, rest = name[: match.start()], name[match.end() :]
    expanded = []
    for item in match[1].split(","):
        bounds = item.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            values = [bounds[0]]
        elif len(bounds) == 2 and all(b.isdigit() for b in bounds) and int(bounds[0]) <= int(bounds[1]):
            width = len(bounds[0])
            values = [str(v).zfill(width) for v in range(int(bounds[0]), int(bounds[1]) + 1)]
        else:
            raise ValueError(f"SLURM node list item {item!r} in {name!r} is not a number or an ascending range a-b")
        expanded.extend(prefix + value + tail for value in values for tail in _expand_name(rest))
    return expanded


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``scontrol show hostnames`` when available, else :func:`expand_nodelist`."""
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        result = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True)
        if result.returncode == 0 and result.stdout.split():
            return result.stdout.split()[0]
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} names no host")
    return hosts[0]


def port_from_job_id(job_id: str) -> int:
    """A port in [20000, 60000) that every task of a job derives alike from its id (digits of array ids included)."""
    digits = re.sub(r"\D", "", job_id)
    if not digits:
        raise ValueError(f"SLURM_JOB_ID={job_id!r} holds no digits; set MASTER_PORT explicitly")
    low, high = PORT_RANGE
    return low + int(digits) % (high - low)


def _torchrun(env: Mapping[str, str]) -> DistributedEnvironment:
    world_size = _int(env, "WORLD_SIZE", "torchrun")
    return DistributedEnvironment(
        launcher="torchrun",
        rank=_int(env, "RANK", "torchrun"),
        world_size=world_size,
        local_rank=_int(env, "LOCAL_RANK", "torchrun"),
        local_world_size=_int(env, "LOCAL_WORLD_SIZE", "torchrun") if "LOCAL_WORLD_SIZE" in env else world_size,
        master_addr=env["MASTER_ADDR"],
        master_port=_int(env, "MASTER_PORT", "torchrun"),
    )


def _slurm(env: Mapping[str, str]) -> DistributedEnvironment:
    world_size = _int(env, "SLURM_NTASKS", "SLURM")
    if "SLURM_NTASKS_PER_NODE" in env and env["SLURM_NTASKS_PER_NODE"].isdigit():
        local_world_size = int(env["SLURM_NTASKS_PER_NODE"])
    elif "SLURM_JOB_NUM_NODES" in env and env["SLURM_JOB_NUM_NODES"].isdigit():
        local_world_size = max(1, world_size // int(env["SLURM_JOB_NUM_NODES"]))
    else:
        local_world_size = world_size
    port = _int(env, "MASTER_PORT", "SLURM") if "MASTER_PORT" in env else port_from_job_id(env["SLURM_JOB_ID"])
    return DistributedEnvironment(
        launcher="slurm",
        rank=_int(env, "SLURM_PROCID", "SLURM"),
        world_size=world_size,
        local_rank=_int(env, "SLURM_LOCALID", "SLURM"),
        local_world_size=local_world_size,
        master_addr=env.get("MASTER_ADDR") or first_host(env["SLURM_JOB_NODELIST"]),
        master_port=port,
    )


def detect_environment(env: Mapping[str, str] | None = None) -> DistributedEnvironment:
    """torchrun if all its variables are set, else SLURM if all its are, else one local process."""
    env = os.environ if env is None else env
    if all(key in env for key in TORCHRUN_KEYS):
        found = _torchrun(env)
    elif all(key in env for key in SLURM_KEYS):
        found = _slurm(env)
    else:
        partial = [key for key in TORCHRUN_KEYS if key in env]
        if "WORLD_SIZE" in env and env["WORLD_SIZE"] != "1":
            missing = [key for key in TORCHRUN_KEYS if key not in env]
            raise ValueError(
                f"WORLD_SIZE={env['WORLD_SIZE']} is set but {', '.join(missing)} are not (found {', '.join(partial)}); "
                "launch with torchrun (which sets them all) or unset WORLD_SIZE for one process"
            )
        return DistributedEnvironment(launcher="local")
    if not 0 <= found.rank < found.world_size or not 0 <= found.local_rank < found.local_world_size:
        raise ValueError(
            f"{found.launcher} environment is inconsistent: rank {found.rank} of {found.world_size}, local rank "
            f"{found.local_rank} of {found.local_world_size}"
        )
    return found
