"""What a results file says about how it was made: the command line, the code (package version, git revision), the
weights (path and SHA-256), the datasets, the sizes, the seed and the wall time (docs/evaluation.md, "Results").

The weights are identified by the bytes that were loaded: a file's SHA-256; for an export folder, the SHA-256 of
its weight files' names and digests; for a hub name or URL, the file in torch.hub's cache that the loader read.
"""

import functools
import hashlib
import os
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import torch

import franca
from franca.hub import DEFAULT_WEIGHTS, HUB_ENTRIES, get_weights
from franca.utils.digest import file_sha256

WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
REPOSITORY_ROOT = Path(__file__).resolve().parents[2]


def git_revision(root: Path = REPOSITORY_ROOT) -> str | None:
    """The checked-out commit of the repository holding this package, or None outside a git checkout."""
    if not (root / ".git").exists():
        return None
    try:
        result = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def hub_checkpoint_dir() -> Path:
    """torch.hub's checkpoint cache (follows ``$TORCH_HOME``), where :mod:`franca.hub` keeps downloads."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _cached_url_path(url: str) -> Path:
    """Where a download of ``url`` is cached: torch.hub's checkpoint folder, under the URL's file name."""
    return hub_checkpoint_dir() / os.path.basename(urlparse(url).path)


def resolve_weights_file(weights: str) -> Path | None:
    """The local file or folder a ``--weights`` value was read from (hub names and URLs: the cached download)."""
    entry, _, name = weights.partition(":")
    if entry in HUB_ENTRIES and not os.path.exists(weights):
        arch = HUB_ENTRIES[entry]
        release = get_weights(arch, name or DEFAULT_WEIGHTS[arch])
        if release.is_multipart:
            return hub_checkpoint_dir() / release.checkpoint_file
        return _cached_url_path(release.urls[0])
    if urlparse(weights).scheme in ("http", "https"):
        return _cached_url_path(weights)
    return Path(weights).expanduser()


def folder_sha256(folder: Path) -> str:
    """SHA-256 over ``<name> <file SHA-256>`` lines of the folder's weight files, in name order."""
    lines = [
        f"{path.name} {file_sha256(path)}\n"
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name.endswith(WEIGHT_FILE_SUFFIXES)
    ]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


@functools.lru_cache(maxsize=16)
def describe_weights(weights: str | None) -> dict | None:
    """``{"source", "path", "sha256"}`` of a ``--weights`` / ``--rasa-weights`` value; path and digest are None when
    the file is not on this machine. Computed once per value and process (results rewritten during a run reuse it);
    callers get a copy to change."""
    if weights is None:
        return None
    path = resolve_weights_file(str(weights))
    if path is None or not path.exists():
        return {"source": str(weights), "path": None, "sha256": None}
    digest = folder_sha256(path) if path.is_dir() else file_sha256(path)
    return {"source": str(weights), "path": str(path.resolve()), "sha256": digest}


def _copy(description: dict | None) -> dict | None:
    return None if description is None else dict(description)


def results_metadata(
    command_line: str,
    weights: str | None,
    rasa_weights: str | None,
    datasets: dict[str, object],
    sizes: dict[str, object],
    seed: int | None,
    started: float,
    input_decoding: dict | None = None,
) -> dict:
    """The ``metadata`` block of every ``results_eval_*.json``; ``started`` is a :func:`time.perf_counter` value,
    ``input_decoding`` how image files were decoded (the options and where they came from)."""
    return {
        "command": command_line,
        "franca_version": franca.__version__,
        "git_revision": git_revision(),
        "weights": _copy(describe_weights(weights)),
        "rasa_weights": _copy(describe_weights(rasa_weights)),
        "datasets": datasets,
        "sizes": sizes,
        "input_decoding": input_decoding,
        "seed": seed,
        "wall_time_s": round(time.perf_counter() - started, 3),
    }
