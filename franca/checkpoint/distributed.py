"""Training checkpoints that resume at any world size (the original
``FSDPCheckpointer`` of valeoai/Franca ``franca/fsdp/__init__.py`` needed the same world size).

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

Recovery (training.md, "Recovery"): every write goes through a temporary that a failed write removes and a restarted
run sweeps; resume falls back from an unreadable newest checkpoint to the next older one and moves the damaged one
aside; a checkpoint that reads but does not fit the configured model stops the run instead, since that is a changed
config, not damage. Every checkpoint carries a record (:mod:`franca.checkpoint.records`): the run that wrote it and the
SHA-256 of its files. Resume takes only the checkpoints of its own run, and a file whose digest no longer matches is
damage like a truncated one.
"""

import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from franca.checkpoint.disk_full import checkpoint_disk_full_error
from franca.checkpoint.records import (
    RECORD_SUFFIX,
    CheckpointRecord,
    RecordError,
    RunIdentity,
    digest_owned_files,
    read_record,
    record_path,
    verification_problems,
    write_record,
)
from franca.checkpoint.resumable import CHECKPOINT_PATTERN, capture_rng_state
from franca.distributed import (
    all_gather_object,
    any_rank,
    barrier,
    broadcast_object,
    get_rank,
    get_world_size,
    is_main_process,
)
from franca.models.weights import check_fits, fit_pos_embed, split_prefix
from franca.utils.atomic import sweep_stale_temporaries
from franca.utils.digest import file_sha256
from franca.utils.names import unwrapped_name
from franca.utils.state_tensors import nonfinite_tensors, state_nbytes
from franca.utils.weight_files import UnreadableCheckpointError, atomic_torch_save, load_torch_file

DCP_PATTERN = re.compile(r"^dcp_(\d{7})$")
DCP_STAGING_PATTERN = re.compile(r"^\.dcp_\d{7}\.tmp$")
TRAIN_STATE_FILE = "train_state.pth"
UNREADABLE_SUFFIX = ".unreadable"


class CheckpointMismatchError(RuntimeError):
    """A readable checkpoint whose tensors do not fit the configured model (another architecture or config)."""


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pth"


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What the trainer needs after loading: where to resume, and this rank's RNG states if they apply; whether its
    files passed their SHA-256 check (False: it has no record), and the names of its tensors (this rank's shards)
    that hold NaN or infinity."""

    path: Path
    iteration: int
    saved_world_size: int
    rng: dict | None
    scaler: dict | None
    verified: bool = False
    nonfinite: tuple[str, ...] = ()


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


def move_aside(path: Path) -> Path:
    """Rename an unreadable checkpoint to ``<name>.unreadable`` (``.unreadable.<n>`` if taken), with its record: kept,
    but no longer listed, resumed from or pruned."""
    target = path.with_name(path.name + UNREADABLE_SUFFIX)
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}{UNREADABLE_SUFFIX}.{n}")
        n += 1
    record = None if path.is_dir() else record_path(path)  # a DCP folder holds its record
    os.replace(path, target)
    if record is not None and record.is_file():
        os.replace(record, record_path(target))
    return target


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint (file with its record, or DCP folder)."""
    if path.is_dir():
        shutil.rmtree(path)
        return
    record_path(path).unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def verify_checkpoint(path: str | os.PathLike, collective: bool = True) -> CheckpointRecord | None:
    """Check the files of ``path`` against the SHA-256 digests of its record; return the record (None when it has
    none). A mismatch, a missing file or a garbled record is an :class:`UnreadableCheckpointError`. With
    ``collective``, each rank checks the files it owns and all ranks raise together."""
    path = Path(path)
    rank, world = (get_rank(), get_world_size()) if collective else (0, 1)
    record, problems = None, []
    try:
        record = read_record(path)
        if record is not None:
            problems = verification_problems(path, record, rank, world)
    except RecordError as err:
        problems = [str(err)]
    if collective and world > 1:
        problems = [problem for found in all_gather_object(problems) for problem in found]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UnreadableCheckpointError(f"{path} fails its integrity check: {problems[0]}{more}")
    return record


def read_checkpoint_file(path: Path) -> dict:
    """One checkpoint file through :func:`franca.utils.weight_files.load_torch_file`: damage (a missing, empty,
    truncated or corrupt file, or one the weights-only reader refuses) is an :class:`UnreadableCheckpointError` naming
    the file and what is wrong; an I/O error of the storage itself (``OSError``: EIO, a stale NFS handle, no
    permission) is raised as it is, since it says nothing about the file and must not send resume to an older
    checkpoint."""
    if not path.is_file():
        raise UnreadableCheckpointError(f"{path} is missing", path, "missing")
    return load_torch_file(path)


def _check_fits(stored: dict[str, torch.Size], own: dict[str, torch.Size], path: Path) -> None:
    """Raise :class:`CheckpointMismatchError` when the stored model tensors do not match the model's names/shapes."""
    hint = (
        "It was written with another architecture or config (student.*, dino.*, ibot.*, crops.global_crops_size); "
        "use the config it was trained with, or a new --output-dir / --no-resume"
    )
    check_fits(own, stored, str(path), "the configured model", hint, error=CheckpointMismatchError)


def _model_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Global shapes of the model's state (DTensor shapes are global under FSDP2)."""
    return {k: v.shape for k, v in get_model_state_dict(model).items()}


def read_dcp_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP folder whose key starts with ``prefix``, read whole on one process without a process
    group (keys keep the prefix)."""
    metadata = _read_dcp_metadata(path)
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and hasattr(meta, "size")
    }
    if state:
        try:
            dcp.load(state, checkpoint_id=str(path), no_dist=True)
        except (Exception, CheckpointException) as err:  # DCP reports read failures as a BaseException
            raise UnreadableCheckpointError(f"cannot read the tensors of {path}: {_first_line(err)}") from err
    return state


def _read_dcp_metadata(path: Path):
    try:
        return dcp.FileSystemReader(str(path)).read_metadata()
    except (Exception, CheckpointException) as err:
        raise UnreadableCheckpointError(
            f"cannot read the DCP metadata of {path} (its .metadata file is missing or corrupt: "
            f"{type(err).__name__}: {err})"
        ) from err


class TrainingCheckpointer:
    """Save / load of training checkpoints: one file with one process, a DCP folder with several (all ranks call).

    ``keep`` counts checkpoints of both layouts together, so a run resumed at another world size prunes old ones too.
    :meth:`resume` falls back from an unreadable newest checkpoint to the next older one (docs: training.md,
    "Recovery"); :meth:`sweep` removes what killed writers left behind. Every checkpoint is written with its record
    (:mod:`franca.checkpoint.records`); with ``run``, the record names that run, and resume and pruning consider only
    the checkpoints recorded for it (others stay where they are). :attr:`verified` lists (iteration, path) of the
    checkpoints this process wrote, or loaded with a passing SHA-256 check, oldest first; :attr:`resumed` is what
    :meth:`resume` loaded.
    """

    def __init__(self, output_dir: str | os.PathLike, keep: int = 2, run: RunIdentity | None = None):
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep}")
        self.dir = Path(output_dir) / "checkpoints"
        self.keep = keep
        self.run = run
        self.verified: list[tuple[int, Path]] = []
        self.resumed: LoadedCheckpoint | None = None

    def sweep(self) -> list[Path]:
        """Rank 0, before any rank writes: remove temporary files of dead writers, every DCP staging folder, and
        records left without their checkpoint."""
        removed = sweep_stale_temporaries(self.dir, extra_patterns=(DCP_STAGING_PATTERN,))
        if self.dir.is_dir():
            for record in sorted(self.dir.glob(f"model_*.pth{RECORD_SUFFIX}")):
                if not record.with_name(record.name.removesuffix(RECORD_SUFFIX)).exists():
                    record.unlink()
                    removed.append(record)
        for path in removed:
            print(f"removed {path}, left by an interrupted checkpoint write", flush=True)
        return removed

    def save(
        self,
        iteration: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None = None,
        config_yaml: str = "",
        backbone_config: dict | None = None,
    ) -> Path:
        """Write the state to resume at ``iteration`` (the next one to run), with its record, and return its path.
        ``config_yaml`` (the run's config) and ``backbone_config`` (the evaluated backbone's ``ViTConfig`` dict) go
        with it, so that the checkpoint alone rebuilds its backbone (``franca_from_checkpoint``: the head count is
        not in the shapes)."""
        described = {"config": config_yaml, **({"backbone_config": backbone_config} if backbone_config else {})}
        try:
            path = self._save(iteration, model, optimizer, scaler, described)
        except (OSError, RuntimeError, CheckpointException) as err:
            full = self._disk_full(err, iteration, model, optimizer)
            if full is None:
                raise
            raise full from err
        self.verified.append((iteration, path))
        self._prune()
        return path

    def _disk_full(self, err: BaseException, iteration: int, model: nn.Module, optimizer) -> OSError | None:
        """The disk-full error to raise for ``err``, None when it is something else (:mod:`.disk_full`)."""
        needed = state_nbytes(model.state_dict()) + state_nbytes(list(optimizer.state.values()))
        previous = list_checkpoints(self.dir)
        previous_size = _size_of(previous[-1][1]) if previous else None
        return checkpoint_disk_full_error(err, self.dir, iteration, needed, previous_size)

    def _save(self, iteration, model, optimizer, scaler, described: dict) -> Path:
        if get_world_size() == 1:
            path = self.dir / f"model_{iteration:07d}.pth"
            state = {
                "iteration": iteration,
                "rng": capture_rng_state(),
                **model_and_optimizer_state(model, optimizer),
                **described,
            }
            if scaler is not None:
                state["scaler"] = scaler.state_dict()

            def record(temporary: Path) -> None:
                write_record(path, CheckpointRecord.of(iteration, {path.name: file_sha256(temporary)}, self.run))

            return atomic_torch_save(state, path, before_replace=record)
        final = self.dir / f"dcp_{iteration:07d}"
        temp = self.dir / f".dcp_{iteration:07d}.tmp"
        if is_main_process():
            shutil.rmtree(temp, ignore_errors=True)
            temp.mkdir(parents=True)
        barrier()
        try:
            dcp.save(model_and_optimizer_state(model, optimizer), checkpoint_id=str(temp))
            self._finish_dcp(temp, iteration, scaler, described)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        barrier()
        if is_main_process():
            if final.exists():
                shutil.rmtree(final)
            os.replace(temp, final)
        barrier()
        return final

    def _finish_dcp(self, temp: Path, iteration: int, scaler, described: dict) -> None:
        """After ``dcp.save``: each rank writes its RNG file (rank 0 the train state too), then, once every rank has
        written, hashes the files it owns; rank 0 writes the record. A failure on any rank raises on every rank."""
        rank, error, digests = get_rank(), None, {}
        try:
            atomic_torch_save(capture_rng_state(), temp / rng_file(rank))
            if is_main_process():
                train_state = {
                    "iteration": iteration,
                    "world_size": get_world_size(),
                    **described,
                    **({"scaler": scaler.state_dict()} if scaler is not None else {}),
                }
                atomic_torch_save(train_state, temp / TRAIN_STATE_FILE)
        except OSError as err:
            error = err
        _raise_together(error, f"writing its part of {temp}")  # from here on, every file of the folder is complete
        try:
            digests = digest_owned_files(temp, rank, get_world_size())
        except OSError as err:
            error = err
        _raise_together(error, f"hashing its files in {temp}")
        files = {name: digest for part in all_gather_object(digests) for name, digest in part.items()}
        if is_main_process():
            try:
                write_record(temp, CheckpointRecord.of(iteration, files, self.run))
            except OSError as err:
                error = err
        _raise_together(error, f"writing the record of {temp}")

    def _of_this_run(self, found: list[tuple[int, Path]], quiet: bool = False) -> list[tuple[int, Path]]:
        """The checkpoints of ``found`` recorded for this run (all of them without a run); a garbled record is kept,
        so that resume reports it as damage. Unless ``quiet``, says which are passed over and why."""
        if self.run is None:
            return found
        kept = []
        for iteration, path in found:
            try:
                record = read_record(path)
            except RecordError:
                kept.append((iteration, path))
                continue
            if record is not None and record.run_id == self.run.run_id:
                kept.append((iteration, path))
            elif not quiet:
                why = (
                    f"it was written by run {record.run_id}, not by this folder's run {self.run.run_id}"
                    if record is not None
                    else "it has no record of the run that wrote it (copied here, or written by an older franca)"
                )
                print(
                    f"not resuming from {path}: {why}; it stays where it is. To continue from it, pass it as "
                    "MODEL.WEIGHTS of a run in a new --output-dir",
                    flush=True,
                )
        return kept

    def _prune(self) -> None:
        if not is_main_process():
            return
        for _, old in self._of_this_run(list_checkpoints(self.dir), quiet=True)[: -self.keep]:
            remove_checkpoint(old)

    def candidates(self) -> list[Path]:
        """Every complete checkpoint of this run, newest first (rank 0's view, shared with all ranks)."""
        found = self._of_this_run(list_checkpoints(self.dir)) if is_main_process() else None
        return [path for _, path in reversed(broadcast_object(found))]

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> LoadedCheckpoint | None:
        """Load the newest readable checkpoint of this run into ``model`` and ``optimizer``; None when there is none.

        An unreadable one (including one whose files fail their SHA-256 check) is reported (file and error) and the
        next older one is tried; once one loads, the unreadable newer ones are moved aside (``<name>.unreadable``),
        never deleted. When none loads, nothing is moved and the error lists what was tried. A readable checkpoint
        that does not fit the model stops at once (:class:`CheckpointMismatchError`): that is a config change, not
        damage.
        """
        failures: list[tuple[Path, str]] = []
        for path in self.candidates():
            error = None
            try:
                loaded = self.load(path, model, optimizer)
            except UnreadableCheckpointError as err:
                error = str(err)
            if not any_rank(error is not None):
                self._set_aside(failures)
                self.resumed = loaded
                if loaded.verified:
                    self.verified.append((loaded.iteration, loaded.path))
                return loaded
            error = broadcast_object(error) or f"cannot read {path} on another rank"
            print(f"WARNING: {error}; trying the next older checkpoint", flush=True)
            failures.append((path, error))
        if failures:
            tried = "\n".join(f"  {path}: {error}" for path, error in failures)
            raise UnreadableCheckpointError(
                f"no readable checkpoint in {self.dir}; tried, newest first:\n{tried}\nNothing was moved or deleted. "
                "Move the damaged files away to start from iteration 0, or pass --no-resume"
            )
        return None

    def _set_aside(self, failures: list[tuple[Path, str]]) -> None:
        if is_main_process():
            for path, _ in failures:
                print(f"moved the unreadable checkpoint {path} to {move_aside(path)}", flush=True)
        barrier()

    def load(
        self,
        path: str | os.PathLike,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> LoadedCheckpoint:
        """Load ``path`` (a ``dcp_*`` folder or a ``model_*.pth`` file) into ``model`` and ``optimizer``, after
        checking its files against its record.

        Raises :class:`UnreadableCheckpointError` when it cannot be read or fails the check, and
        :class:`CheckpointMismatchError` when it does not fit the model; both name the path.
        """
        path = Path(path)
        verified = verify_checkpoint(path) is not None
        loaded = _load_dcp(path, model, optimizer) if path.is_dir() else _load_single_file(path, model, optimizer)
        return replace(loaded, verified=verified)


def _raise_together(error: BaseException | None, what: str) -> None:
    """Raise on every rank when ``error`` happened on any: the error itself where it happened, elsewhere an error
    naming what another rank failed."""
    if not any_rank(error is not None):
        return
    if error is not None:
        raise error
    raise RuntimeError(f"another rank failed {what}")


def _first_line(err: BaseException) -> str:
    """A one-line description of ``err``; for a DCP ``CheckpointException``, the first rank's exception."""
    failures = getattr(err, "failures", None)
    if failures:
        exc = next(iter(failures.values()))
        err = exc[0] if isinstance(exc, tuple) else exc
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _load_dcp(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> LoadedCheckpoint:
    """Everything that can be read apart (train state, RNG, metadata) is read and checked before the tensors are
    loaded in place, so a damaged folder is found before it touches the model where possible."""
    train_state = read_checkpoint_file(path / TRAIN_STATE_FILE)
    if not isinstance(train_state, dict) or not {"iteration", "world_size"} <= set(train_state):
        raise UnreadableCheckpointError(f"{path / TRAIN_STATE_FILE} lacks 'iteration' and 'world_size'")
    saved_world_size = int(train_state["world_size"])
    rank_rng = path / rng_file(get_rank())
    same_world = saved_world_size == get_world_size() and rank_rng.is_file()
    rng = read_checkpoint_file(rank_rng) if same_world else None
    metadata = _read_dcp_metadata(path)
    stored = {
        key[len("model.") :]: meta.size
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith("model.") and hasattr(meta, "size")
    }
    _check_fits(stored, _model_shapes(model), path)
    state = model_and_optimizer_state(model, optimizer)
    # Optimizer state is partial where parameters never had a gradient (e.g. iBOT heads without masks, the frozen
    # backbone of the heads-first stage): forget_unsaved_moments drops the fresh moments they were given.
    try:
        dcp.load(state, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=True))
    except (Exception, CheckpointException) as err:  # DCP reports read failures as a BaseException
        raise UnreadableCheckpointError(f"cannot read the tensors of {path}: {_first_line(err)}") from err
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    prefix = "optimizer.state."
    saved = {key[len(prefix) :].rsplit(".", 1)[0] for key in metadata.state_dict_metadata if key.startswith(prefix)}
    forget_unsaved_moments(model, optimizer, saved)
    iteration, scaler = int(train_state["iteration"]), train_state.get("scaler")
    return LoadedCheckpoint(path, iteration, saved_world_size, rng, scaler, nonfinite=tuple(nonfinite_tensors(state)))


def forget_unsaved_moments(model: nn.Module, optimizer: torch.optim.Optimizer, saved: set[str]) -> None:
    """Drop the optimizer state of every parameter that had none in the checkpoint (``saved``: the names that had).

    ``set_optimizer_state_dict`` first gives every parameter zero moments at step 1 (a fake step with zero gradients,
    to have a complete state to load into); a parameter that had no gradient before the checkpoint (the frozen
    backbone of the heads-first stage, an iBOT head without masked tokens) would then start its bias correction one
    step late. Without that state it starts at its first gradient, as in the uninterrupted run.
    """
    for name, param in model.named_parameters():
        if unwrapped_name(name) not in saved:
            optimizer.state.pop(param, None)


def _load_single_file(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> LoadedCheckpoint:
    state = read_checkpoint_file(path)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or "iteration" not in state:
        raise UnreadableCheckpointError(f"{path} is not a franca training checkpoint (no 'model' and 'iteration')")
    _check_fits({k: v.shape for k, v in state["model"].items()}, _model_shapes(model), path)
    set_model_state_dict(model, state["model"], options=StateDictOptions(full_state_dict=True))
    # non-strict for the optimizer only: parameters that never had a gradient have no saved moments (see _load_dcp)
    partial = StateDictOptions(full_state_dict=True, strict=False)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=partial)
    forget_unsaved_moments(model, optimizer, set(state["optimizer"]["state"]))
    rng = state["rng"] if get_world_size() == 1 else None
    nonfinite = tuple(nonfinite_tensors({"model": state["model"], "optimizer": state["optimizer"]}))
    return LoadedCheckpoint(path, int(state["iteration"]), 1, rng, state.get("scaler"), nonfinite=nonfinite)


def read_model_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], int]:
    """The full model state dict (``student.*``, ``teacher.*``, loss buffers) and iteration of a checkpoint file or
    DCP folder, read on every process without collectives (for ``MODEL.WEIGHTS``), after checking its files against
    its record."""
    path = Path(path)
    verify_checkpoint(path, collective=False)
    if path.is_dir():
        iteration = int(read_checkpoint_file(path / TRAIN_STATE_FILE)["iteration"])
        model_state, _ = split_prefix(read_dcp_tensors(path, "model."), "model.")
        return model_state, iteration
    state = read_checkpoint_file(path)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise UnreadableCheckpointError(f"{path} is not a franca training checkpoint (no 'model' state)")
    return state["model"], int(state.get("iteration", 0))


def load_model_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Load a full model state (``read_model_state``) into ``model``, strictly, resizing every backbone position grid
    that differs from the model's with the model's own run-time interpolation (high-resolution finetuning from a
    lower-resolution run, as ``scripts/modify_ckpt_highres.py`` does offline)."""
    own = _model_shapes(model)
    state = dict(state)
    for key, tensor in state.items():
        if key.endswith("backbone.pos_embed") and key in own and tensor.shape != own[key]:
            backbone = model.get_submodule(key.removesuffix(".pos_embed"))
            grid = backbone.img_size // backbone.patch_size
            state[key] = fit_pos_embed(tensor, grid, backbone.interpolate_offset, backbone.interpolate_antialias)
    _check_fits({k: v.shape for k, v in state.items()}, own, Path(source))
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
