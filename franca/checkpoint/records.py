"""What is recorded with every training checkpoint: the run that wrote it and the SHA-256 of each of its files.

A checkpoint that reads may still be damaged (one flipped bit in a zip member loads without complaint), and a
checkpoint in the folder may belong to another run (a run started over, a file copied in). The record answers both:

* ``model_<it>.pth.record.json`` beside a single-file checkpoint, ``dcp_<it>/record.json`` inside a DCP folder:
  ``{"iteration", "run_id", "config_digest", "world_size", "config", "files": {name: sha256}, "adopted"}``. It is
  written before the checkpoint appears under its final name, so a checkpoint never exists without it. ``files``
  lists the checkpoint file, or every file of the DCP folder (each rank's shards and RNG file, the metadata, the train
  state). ``config`` is the resolved config it was trained with (resume compares it with the new one), ``adopted``
  marks checkpoints written before records existed, recorded as found when their folder was first opened.
* ``<output_dir>/run.json`` names the run the folder belongs to (``run_id``; written by
  :mod:`franca.train.run_folder`): resume and consolidation take only checkpoints whose record has that run id.

Each rank hashes and verifies the DCP files it wrote (``__<r>_*.distcp``, ``rng_rank<r>.pth``; rank 0 the rest),
saved rank ``r`` mapping to rank ``r % world_size`` when the world size changed, so no rank reads every shard.
"""

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from franca.utils.atomic import TEMPORARY_PATTERN, atomic_write
from franca.utils.digest import SHA256_PATTERN, file_sha256

RECORD_SUFFIX = ".record.json"
DCP_RECORD_FILE = "record.json"
RUN_FILE = "run.json"
_RANK_FILE = re.compile(r"^(?:__(\d+)_\d+\.distcp|rng_rank(\d+)\.pth)$")


class RecordError(ValueError):
    """A checkpoint record that exists but cannot be read (not JSON, or missing its fields)."""


@dataclass(frozen=True)
class RunIdentity:
    """The run writing checkpoints: its id, the digest of the config keys that shape the model, the resolved config
    and the number of processes."""

    run_id: str
    config_digest: str = ""
    config: dict | None = None
    world_size: int = 1


@dataclass(frozen=True)
class CheckpointRecord:
    iteration: int
    files: dict[str, str]
    run_id: str | None = None
    config_digest: str | None = None
    world_size: int | None = None
    config: dict | None = None
    adopted: bool = False

    @classmethod
    def of(cls, iteration: int, files: dict[str, str], run: RunIdentity | None) -> "CheckpointRecord":
        if run is None:
            return cls(iteration, files)
        return cls(iteration, files, run.run_id, run.config_digest, run.world_size, run.config)


def record_path(checkpoint: str | os.PathLike) -> Path:
    """Where the record of ``checkpoint`` lives: inside a DCP folder, beside a single file."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        return checkpoint / DCP_RECORD_FILE
    return checkpoint.with_name(checkpoint.name + RECORD_SUFFIX)


def write_record(checkpoint: str | os.PathLike, record: CheckpointRecord) -> Path:
    return atomic_write(record_path(checkpoint), json.dumps(asdict(record), indent=1) + "\n")


def read_record(checkpoint: str | os.PathLike) -> CheckpointRecord | None:
    """The record of ``checkpoint``; None when it has none, :class:`RecordError` when it is garbled."""
    path = record_path(checkpoint)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if not isinstance(files, dict) or not all(SHA256_PATTERN.fullmatch(str(d)) for d in files.values()):
            raise ValueError("'files' must map file names to SHA-256 digests")
        return CheckpointRecord(**{**data, "iteration": int(data["iteration"])})
    except (ValueError, KeyError, TypeError) as err:
        raise RecordError(f"the record {path} is garbled ({type(err).__name__}: {err})") from err


def file_owner(name: str, world_size: int) -> int:
    """The rank that hashes and verifies a DCP file (module docstring)."""
    match = _RANK_FILE.match(name)
    saved_rank = int(match[1] or match[2]) if match else 0
    return saved_rank % world_size


def digest_owned_files(folder: Path, rank: int = 0, world_size: int = 1) -> dict[str, str]:
    """SHA-256 of the files of a DCP folder that ``rank`` owns (all of them with one process)."""
    names = sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.is_file() and entry.name != DCP_RECORD_FILE and not TEMPORARY_PATTERN.match(entry.name)
    )
    return {name: file_sha256(folder / name) for name in names if file_owner(name, world_size) == rank}


def verification_problems(
    checkpoint: str | os.PathLike, record: CheckpointRecord, rank: int = 0, world_size: int = 1
) -> list[str]:
    """What differs from ``record`` among the files ``rank`` owns: missing files and SHA-256 mismatches."""
    checkpoint = Path(checkpoint)
    base = checkpoint if checkpoint.is_dir() else checkpoint.parent
    problems = []
    for name, expected in sorted(record.files.items()):
        if file_owner(name, world_size) != rank:
            continue
        path = base / name
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        actual = file_sha256(path)
        if actual != expected:
            problems.append(
                f"{path} has SHA-256 {actual[:16]}..., not the {expected[:16]}... recorded when it was written "
                "(its bytes changed on disk: a flipped bit, a bad copy)"
            )
    return problems


def read_run_id(output_dir: str | os.PathLike) -> str | None:
    """The run id of a run folder (its ``run.json``), or None for a folder without one."""
    path = Path(output_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return str(json.loads(path.read_text())["run_id"])
    except (ValueError, KeyError, TypeError) as err:
        raise RecordError(f"{path} is garbled ({type(err).__name__}: {err}); restore it or move it away") from err
