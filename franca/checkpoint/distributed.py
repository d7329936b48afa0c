"""Training checkpoints that resume at any world size (reference §4.8, fixing §10 item 13).

One in-memory format for every world size: the model and optimizer state dicts keyed by parameter names (FQNs), from
``torch.distributed.checkpoint.state_dict.get_{model,optimizer}_state_dict``: sharded DTensors under FSDP2, plain
tensors otherwise. Two storage layouts under ``<output_dir>/checkpoints/``:

* ``model_<iteration:07d>.pth``: one file, written by a single process (:class:`franca.checkpoint.Checkpointer`);
* ``dcp_<iteration:07d>/``: a ``torch.distributed.checkpoint`` (DCP) folder written collectively by all ranks, each
  its own shards, plus ``train_state.pth`` (iteration, world size, grad scaler, config) and ``rng_rank<r>.pth`` (the
  RNG states of rank r). It is written to ``.dcp_<iteration>.tmp/`` and renamed by rank 0 after a barrier, so a
  crash never leaves a torn checkpoint; the last ``keep`` checkpoints are kept.

Either layout loads at any world size: DCP re-slices the stored tensors to the current sharding, and a single file
is distributed with ``full_state_dict=True``. The data position is the iteration alone (the loader's global batches
do not depend on the world size), so the original's ``sampler_advance=0`` restart of the data order cannot happen.
RNG states are restored when the world size is unchanged; otherwise they cannot correspond, and the caller reseeds.
"""

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from franca.checkpoint.resumable import CHECKPOINT_PATTERN, Checkpointer, atomic_torch_save, capture_rng_state
from franca.distributed import barrier, broadcast_object, get_rank, get_world_size, is_main_process

DCP_PATTERN = re.compile(r"^dcp_(\d{7})$")
TRAIN_STATE_FILE = "train_state.pth"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pth"


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What the trainer needs after loading: where to resume, and this rank's RNG states if they apply."""

    path: Path
    iteration: int
    saved_world_size: int
    rng: dict | None
    scaler: dict | None


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(iteration, path) of every complete checkpoint, single-file or DCP, oldest first."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        file_match = CHECKPOINT_PATTERN.match(path.name) if path.is_file() else None
        dcp_match = DCP_PATTERN.match(path.name) if (path / TRAIN_STATE_FILE).is_file() else None
        match = file_match or dcp_match
        if match:
            found.append((int(match[1]), path))
    return sorted(found)


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(checkpoint_dir)
    return found[-1][1] if found else None


def model_and_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``{"model": ..., "optimizer": ...}`` keyed by parameter names (sharded under FSDP2); collective when sharded."""
    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}


class TrainingCheckpointer:
    """Save / load of training checkpoints: one file with one process, a DCP folder with several (all ranks call).

    ``keep`` counts checkpoints of both layouts together, so a run resumed at another world size prunes old ones too.
    """

    def __init__(self, output_dir: str | os.PathLike, keep: int = 2):
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep}")
        self.dir = Path(output_dir) / "checkpoints"
        self.keep = keep

    def save(
        self,
        iteration: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None = None,
        config_yaml: str = "",
    ) -> Path:
        """Write the state to resume at ``iteration`` (the next one to run) and return its path."""
        if get_world_size() == 1:
            extra = {"scaler": scaler.state_dict()} if scaler is not None else {}
            path = Checkpointer(self.dir.parent, self.keep).save(
                iteration, **model_and_optimizer_state(model, optimizer), **extra
            )
            self._prune()
            return path
        final = self.dir / f"dcp_{iteration:07d}"
        temp = self.dir / f".dcp_{iteration:07d}.tmp"
        rank = get_rank()
        if is_main_process():
            shutil.rmtree(temp, ignore_errors=True)
            temp.mkdir(parents=True)
        barrier()
        dcp.save(model_and_optimizer_state(model, optimizer), checkpoint_id=str(temp))
        atomic_torch_save(capture_rng_state(), temp / rng_file(rank))
        if is_main_process():
            train_state = {
                "iteration": iteration,
                "world_size": get_world_size(),
                "config": config_yaml,
                **({"scaler": scaler.state_dict()} if scaler is not None else {}),
            }
            atomic_torch_save(train_state, temp / TRAIN_STATE_FILE)
        barrier()
        if is_main_process():
            if final.exists():
                shutil.rmtree(final)
            os.replace(temp, final)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        for _, old in list_checkpoints(self.dir)[: -self.keep]:
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink(missing_ok=True)

    def last(self) -> Path | None:
        """The newest complete checkpoint of either layout (rank 0's view, shared with all ranks)."""
        return broadcast_object(latest_checkpoint(self.dir) if is_main_process() else None)

    def load(
        self,
        path: str | os.PathLike,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> LoadedCheckpoint:
        """Load ``path`` (a ``dcp_*`` folder or a ``model_*.pth`` file) into ``model`` and ``optimizer``."""
        path = Path(path)
        try:
            if path.is_dir():
                return _load_dcp(path, model, optimizer)
            return _load_single_file(path, model, optimizer)
        except (RuntimeError, KeyError, ValueError, OSError) as err:
            raise RuntimeError(
                f"cannot load checkpoint {path}: {err}. Delete it to resume from an older one, or start fresh with "
                "--no-resume"
            ) from err


def _load_dcp(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> LoadedCheckpoint:
    state = model_and_optimizer_state(model, optimizer)
    stored = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    missing = sorted(f"model.{key}" for key in state["model"] if f"model.{key}" not in stored)
    if missing:
        raise KeyError(f"the checkpoint lacks model tensors {missing[:4]} (another architecture or config?)")
    # Optimizer state is partial where parameters never had a gradient (e.g. iBOT heads without masks): those keep
    # the fresh (zero) moments that get_optimizer_state_dict initialised.
    dcp.load(state, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=True))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    train_state = torch.load(path / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    saved_world_size = int(train_state["world_size"])
    rank_rng = path / rng_file(get_rank())
    same_world = saved_world_size == get_world_size() and rank_rng.is_file()
    rng = torch.load(rank_rng, map_location="cpu", weights_only=True) if same_world else None
    return LoadedCheckpoint(path, int(train_state["iteration"]), saved_world_size, rng, train_state.get("scaler"))


def _load_single_file(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> LoadedCheckpoint:
    state = torch.load(path, map_location="cpu", weights_only=True)
    set_model_state_dict(model, state["model"], options=StateDictOptions(full_state_dict=True))
    # non-strict for the optimizer only: parameters that never had a gradient have no saved moments (see _load_dcp)
    partial = StateDictOptions(full_state_dict=True, strict=False)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=partial)
    rng = state["rng"] if get_world_size() == 1 else None
    return LoadedCheckpoint(path, int(state["iteration"]), 1, rng, state.get("scaler"))
