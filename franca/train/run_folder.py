"""A run folder belongs to one run: its lock, its run identity, its config history and ``--no-resume``
(training.md, "Output folder").

* **One run at a time.** Rank 0 holds an OS lock on the folder for the whole run (:mod:`franca.utils.folder_lock`);
  a second trainer on the same folder stops at once on every rank, naming the holder.
* **The run identity.** ``run.json`` names the folder's run (``run_id``) and lists every config it used. Each
  checkpoint records the run that wrote it (:mod:`franca.checkpoint.records`), so resume takes only this run's
  checkpoints. ``--no-resume`` starts a new run: right after locking, the previous run's outputs (checkpoints,
  exports, metrics, configs, logs) are moved, not deleted, to ``previous_runs/<its run id>/``.
* **Config changes.** A resume compares its config with the one recorded with the checkpoint it resumes from, key by
  key, leaving out :data:`FREE_KEYS` (they change how the run is executed or logged, not what it trains) and comparing
  the global batch (``train.batch_size_per_gpu`` times the processes and ``train.grad_accumulation_steps``) instead
  of the per-process one. Any other difference stops the run with the list of differences and the two ways forward:
  the old config, or ``--allow-config-change``, which records the change with the iteration it starts at in
  ``run.json``.
* **Every config is kept.** ``config.yaml`` is the current config; each config the run started with (the first, and
  each different one on a resume) is also written, never overwritten, to
  ``config_history/config_<iteration>[.<n>].yaml``, where ``<iteration>`` is the iteration it started at.

Rank 0 does the work while it holds the lock; the other ranks receive the outcome.
"""

import hashlib
import json
import os
import secrets
import socket
import time
from collections.abc import Callable
from fnmatch import fnmatchcase
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from franca.checkpoint.distributed import list_checkpoints
from franca.checkpoint.records import (
    RUN_FILE,
    CheckpointRecord,
    RecordError,
    RunIdentity,
    digest_owned_files,
    read_record,
    write_record,
)
from franca.distributed import broadcast_object, is_main_process
from franca.utils.atomic import atomic_write
from franca.utils.config_schema import save_config
from franca.utils.digest import file_sha256
from franca.utils.folder_lock import FolderBusyError, acquire_folder_lock, release_all_folder_locks

# Keys that may change on a resume without --allow-config-change: where and how the run executes, logs, exports and
# evaluates, and what is read at iteration 0 only. Everything else shapes the trained model (data, batch, schedules,
# optimiser, architecture, losses, augmentations, precision, seed).
FREE_KEYS: tuple[str, ...] = (
    "train.output_dir",
    "train.log_period",
    "train.num_workers",
    "train.keep_checkpoints",
    "train.saveckp_freq",
    "train.stop_at_iteration",
    "train.health_*",
    "train.drift_*",
    "train.cache_dataset",
    "evaluation.*",
    "MODEL.WEIGHTS",
    "student.pretrained_weights",
    "student.pretrained_heads",
    "train.high_resolution_finetune",
    "student.block_chunks",
    "compute_precision.activation_checkpointing",
    "compute_precision.compile",
    "compute_precision.chunked_losses",
    "compute_precision.loss_chunk_size",
    "compute_precision.distributed",
    "compute_precision.*.*.sharding_strategy",
    "crops.batched_photometric",
)
# Computed from keys that are compared (optim.base_lr and the global batch), so left out of the comparison.
DERIVED_KEYS: tuple[str, ...] = ("optim.lr",)
GLOBAL_BATCH_KEY = "train.global_batch_size"
HISTORY_DIR = "config_history"
PREVIOUS_RUNS_DIR = "previous_runs"
# What a run writes in its folder; --no-resume moves these aside together.
RUN_OUTPUTS = (
    "checkpoints",
    "eval",
    "training_metrics.json",
    "loss_curves.png",
    "tensorboard",
    "logs",
    "config.yaml",
    HISTORY_DIR,
    RUN_FILE,
)


class ConfigChangedError(RuntimeError):
    """A resume whose config differs from the checkpoint's in keys that shape the trained model."""


_OPEN: dict[str, RunIdentity] = {}


def _key(output_dir: str | os.PathLike) -> str:
    return os.path.realpath(output_dir)


def _check_text_path(output_dir: Path) -> None:
    """The folder name goes into config.yaml, which holds text only."""
    try:
        str(output_dir).encode()
    except UnicodeEncodeError:
        raise ValueError(
            f"--output-dir {str(output_dir).encode(errors='surrogateescape')!r} holds bytes that are not UTF-8 "
            "text, and the run's config.yaml must name it; pass a UTF-8 path (e.g. a symlink to that folder)"
        ) from None


def lock_run_folder(output_dir: str | os.PathLike, start_over: bool = False) -> None:
    """Every rank: rank 0 locks ``output_dir`` (creating it) for this process's lifetime and, with ``start_over``
    (``--no-resume``), moves the previous run's outputs aside; all ranks learn the outcome. A folder held by another
    run raises :class:`FolderBusyError` on every rank. Call it before anything reads or writes the folder (the sweep,
    the rank logs)."""
    output_dir = Path(output_dir)
    _check_text_path(output_dir)
    _on_rank_zero(partial(_lock, output_dir, start_over), FolderBusyError)


def _lock(output_dir: Path, start_over: bool) -> None:
    acquire_folder_lock(output_dir)
    if start_over:
        _set_aside_previous_run(output_dir, _read_run_file_quietly(output_dir))


def release_run_folders() -> None:
    """Release the folder locks and forget the run identities of this process (the end of ``main``)."""
    release_all_folder_locks()
    _OPEN.clear()


def run_identity(output_dir: str | os.PathLike) -> RunIdentity | None:
    """The identity :func:`open_run` established for ``output_dir`` in this process (None when it was not called)."""
    return _OPEN.get(_key(output_dir))


def model_config(config: dict, world_size: int) -> dict[str, Any]:
    """The keys of a resolved config that shape the trained model, flattened to dotted keys: all but
    :data:`FREE_KEYS` and :data:`DERIVED_KEYS`, with the per-process batch replaced by the global batch."""
    flat = _flatten(config)
    left_out = FREE_KEYS + DERIVED_KEYS
    shaped = {key: value for key, value in flat.items() if not any(fnmatchcase(key, p) for p in left_out)}
    per_process = shaped.pop("train.batch_size_per_gpu", None)
    if per_process is not None:
        shaped[GLOBAL_BATCH_KEY] = per_process * world_size * shaped.get("train.grad_accumulation_steps", 1)
    return shaped


def config_digest(shaped: dict[str, Any]) -> str:
    """A SHA-256 of the model-shaping keys (:func:`model_config`), independent of key order."""
    return hashlib.sha256(json.dumps(shaped, sort_keys=True, default=str).encode()).hexdigest()


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list]:
    """``{key: [old value, new value]}`` for every key that differs (None for a key one side lacks)."""
    keys = sorted(old.keys() | new.keys())
    return {key: [old.get(key), new.get(key)] for key in keys if old.get(key) != new.get(key)}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    flat = {}
    for name, value in node.items():
        flat.update(_flatten(value, f"{prefix}.{name}" if prefix else str(name)))
    return flat


def open_run(cfg: DictConfig, world_size: int, resume: bool = True, allow_config_change: bool = False) -> RunIdentity:
    """Every rank, with the folder locked: establish the run of ``cfg.train.output_dir`` (module docstring) on rank 0
    and share its identity. Writes ``config.yaml``, the config history and ``run.json``; raises
    :class:`ConfigChangedError` (on every rank) for a resume with a changed model-shaping config."""
    output_dir = Path(cfg.train.output_dir)
    work = partial(_open_on_rank_zero, output_dir, cfg, world_size, resume, allow_config_change)
    identity = _on_rank_zero(work, ConfigChangedError)
    _OPEN[_key(output_dir)] = identity
    return identity


def _on_rank_zero(work: Callable[[], Any], error_type: type[Exception]) -> Any:
    """``work()`` on rank 0, its result on every rank; when it fails, rank 0 raises its error and the other ranks an
    ``error_type`` quoting it (so that no rank waits for the others in a collective)."""
    result, failure = None, None
    if is_main_process():
        try:
            result = work()
        except Exception as err:
            failure = err
    result, message = broadcast_object((result, None if failure is None else f"{type(failure).__name__}: {failure}"))
    if failure is not None:
        raise failure
    if message is not None:
        raise error_type(f"rank 0 stopped: {message}")
    return result


def _read_run_file(output_dir: Path) -> dict | None:
    path = output_dir / RUN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data.get("run_id"), str) or not isinstance(data.get("configs"), list):
            raise ValueError("'run_id' and 'configs' are missing")
        return data
    except ValueError as err:
        raise RecordError(f"{path} is garbled ({err}); restore it, or move it away to start a new run record") from err


def _write_run_file(output_dir: Path, data: dict) -> None:
    atomic_write(output_dir / RUN_FILE, json.dumps(data, indent=1, default=str) + "\n")


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z")


def _new_run() -> dict:
    return {"run_id": f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}", "created": _now(), "configs": []}


def _set_aside_previous_run(output_dir: Path, run: dict | None) -> None:
    """``--no-resume``: move the previous run's outputs to ``previous_runs/<run id>/`` (never delete them)."""
    present = [name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    if not present:
        return
    name = run["run_id"] if run else f"unrecorded-{time.strftime('%Y%m%d-%H%M%S')}"
    target = output_dir / PREVIOUS_RUNS_DIR / name
    n = 1
    while target.exists():
        target = output_dir / PREVIOUS_RUNS_DIR / f"{name}.{n}"
        n += 1
    target.mkdir(parents=True)
    for entry in present:
        os.replace(output_dir / entry, target / entry)
    print(f"--no-resume: moved the previous run's {', '.join(present)} to {target}", flush=True)


def _adopt_unrecorded_checkpoints(output_dir: Path, run_id: str) -> None:
    """A folder written before run records existed: record its checkpoints as this run's, with their digests as
    they are now, so that the run resumes from them."""
    adopted = []
    for iteration, path in list_checkpoints(output_dir / "checkpoints"):
        try:
            if read_record(path) is not None:
                continue
        except RecordError:
            continue
        files = digest_owned_files(path) if path.is_dir() else {path.name: file_sha256(path)}
        write_record(path, CheckpointRecord(iteration, files, run_id, adopted=True))
        adopted.append(path.name)
    if adopted:
        print(
            f"recorded {len(adopted)} checkpoint(s) written before run records as checkpoints of run {run_id}: "
            f"{', '.join(adopted)} (their digests as they are now; their config is not known, so it is not compared)",
            flush=True,
        )


def _newest_of_run(output_dir: Path, run_id: str) -> tuple[int, Path, CheckpointRecord] | None:
    """The newest checkpoint recorded for ``run_id`` (what resume tries first)."""
    for iteration, path in reversed(list_checkpoints(output_dir / "checkpoints")):
        try:
            record = read_record(path)
        except RecordError:
            continue
        if record is not None and record.run_id == run_id:
            return iteration, path, record
    return None


def _old_config_file(output_dir: Path, run: dict, digest: str | None) -> str:
    """The history file of the config with ``digest`` (the newest one), or where the checkpoint records it."""
    matching = [entry["file"] for entry in run["configs"] if entry.get("config_digest") == digest]
    return str(output_dir / matching[-1]) if matching else "the 'config' of the checkpoint's record"


def _check_changes(output_dir: Path, run: dict, newest, shaped: dict, allow: bool) -> dict[str, list]:
    """The model-shaping changes since the checkpoint ``newest`` resumes from; :class:`ConfigChangedError` unless
    ``allow``."""
    if newest is None or newest[2].config is None:
        return {}
    iteration, path, record = newest
    changes = config_changes(model_config(record.config, record.world_size or 1), shaped)
    if changes and not allow:
        listed = "\n".join(f"  {key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())
        raise ConfigChangedError(
            f"this resume of run {run['run_id']} in {output_dir} would continue {path.name} (iteration {iteration}) "
            f"with a config that changes the trained model:\n{listed}\nEither resume with the config it was trained "
            f"with ({_old_config_file(output_dir, run, record.config_digest)}), or pass --allow-config-change to "
            f"continue with the new one (the change and its iteration are recorded in {output_dir / RUN_FILE}). "
            "To start over instead, pass --no-resume (the old run is moved aside) or use a new --output-dir"
        )
    return changes


def _record_config(output_dir: Path, run: dict, cfg: DictConfig, entry: dict) -> None:
    """Write the config to ``config.yaml`` and, when it differs from the last one of the history, to a new history
    file (never overwritten), listed in ``run``."""
    save_config(cfg, output_dir / "config.yaml")
    text = (output_dir / "config.yaml").read_text()
    if run["configs"]:
        last = output_dir / run["configs"][-1]["file"]
        if last.is_file() and last.read_text() == text and "changes" not in entry:
            return
    stem = f"config_{entry['iteration']:07d}"
    name, n = f"{stem}.yaml", 1
    while (output_dir / HISTORY_DIR / name).exists():
        name, n = f"{stem}.{n}.yaml", n + 1
    atomic_write(output_dir / HISTORY_DIR / name, text)
    run["configs"].append({**entry, "file": f"{HISTORY_DIR}/{name}"})


def _open_on_rank_zero(
    output_dir: Path, cfg: DictConfig, world_size: int, resume: bool, allow_config_change: bool
) -> RunIdentity:
    container = OmegaConf.to_container(cfg, resolve=True)
    shaped = model_config(container, world_size)
    run = _read_run_file(output_dir) if resume else None
    if run is None:
        run = _new_run()
        if resume:
            _adopt_unrecorded_checkpoints(output_dir, run["run_id"])
    identity = RunIdentity(run["run_id"], config_digest(shaped), container, world_size)
    newest = _newest_of_run(output_dir, run["run_id"])
    changes = _check_changes(output_dir, run, newest, shaped, allow_config_change)
    entry = {
        "iteration": newest[0] if newest else 0,
        "started": _now(),
        "host": socket.gethostname(),
        "world_size": world_size,
        "config_digest": identity.config_digest,
    }
    if changes:
        entry["changes"] = changes
        entry["allowed_by"] = "--allow-config-change"
        print(
            f"--allow-config-change: {len(changes)} model-shaping key(s) change from iteration {entry['iteration']}: "
            f"{', '.join(changes)} (recorded in {output_dir / RUN_FILE})",
            flush=True,
        )
    _record_config(output_dir, run, cfg, entry)
    _write_run_file(output_dir, run)
    return identity


def _read_run_file_quietly(output_dir: Path) -> dict | None:
    """``run.json`` when it reads, else None (``--no-resume`` moves a garbled one aside with the rest)."""
    try:
        return _read_run_file(output_dir)
    except RecordError:
        return None
