"""Reading and writing weight and checkpoint files: franca's one ``torch.load``, with one error policy, and its
atomic ``torch.save``.

Every ``.pth`` franca reads (released weights, teacher exports, training checkpoints, RASA heads, the files the
scripts convert) goes through :func:`load_torch_file`: ``torch.load(weights_only=True)`` on CPU, so a pickle that
would run code is never executed. What can go wrong is told apart, because the way out differs:

- the storage itself fails (``OSError``: a missing file, no permission, EIO, a stale NFS handle): raised as it is.
  It says nothing about the file, and must not send a resume to an older checkpoint nor a download to be repeated;
- the file is damaged (empty, truncated, corrupt, not a checkpoint): :class:`UnreadableCheckpointError` naming the
  file, its size and what the reader said; the callers then fall back (resume), download again (hub) or say so;
- the file is a well-formed pickle the weights-only reader refuses (it names functions or classes to call):
  :class:`RefusedPickleError`, a kind of :class:`UnreadableCheckpointError` that says how to convert a trusted file
  (:func:`franca.utils.pickle_refusal.refused_pickle` tells it from damage by reading, never running, the opcodes).
"""

import os
from collections.abc import Callable
from pathlib import Path

import torch

from franca.utils.atomic import atomic_write
from franca.utils.pickle_refusal import refused_pickle
from franca.utils.state_tensors import state_nbytes


class UnreadableCheckpointError(RuntimeError):
    """A weight or checkpoint file that exists but cannot be read: empty, truncated, corrupt, not a checkpoint, a
    DCP folder missing files or failing its integrity check, or a pickle the weights-only reader refuses
    (:class:`RefusedPickleError`). ``path``: the file, when one is to blame; ``detail``: what is wrong, briefly."""

    def __init__(self, message: str, path: Path | None = None, detail: str = ""):
        super().__init__(message)
        self.path = path
        self.detail = detail or message


class RefusedPickleError(UnreadableCheckpointError):
    """A well-formed pickle that ``torch.load(weights_only=True)`` refuses: reading it would call what it names."""


def describe_failure(err: BaseException) -> str:
    """The exception's type and the first sentence of its message (torch's messages run on for lines)."""
    lines = str(err).strip().splitlines()
    first = lines[0].split(". ")[0].rstrip(".") if lines else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def unreadable(path: Path, detail: str) -> UnreadableCheckpointError:
    """The error of a damaged file, in the one wording: the file, its size, what is wrong and the way out."""
    size = path.stat().st_size if path.exists() else 0
    return UnreadableCheckpointError(
        f"{path} ({size} bytes) is not a readable checkpoint: {detail}. The file is damaged or incomplete (e.g. an "
        "interrupted write, download or copy); write, download or copy it again from its source",
        path,
        detail,
    )


def load_torch_file(path: str | os.PathLike) -> dict:
    """``torch.load(path, map_location="cpu", weights_only=True)`` under the module's error policy."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:
        refused = refused_pickle(path, err)
        if refused is not None:
            raise RefusedPickleError(
                f"refusing to load {path}: it is {refused}. If you trust its source, load it yourself with "
                "torch.load(weights_only=False) and save its state dict with torch.save(state_dict, path)",
                path,
                f"it is {refused}",
            ) from err
        raise unreadable(path, describe_failure(err)) from err


def atomic_torch_save(obj, path: str | os.PathLike, before_replace: Callable[[Path], None] | None = None) -> Path:
    """``torch.save`` through :func:`franca.utils.atomic.atomic_write`: a crash never leaves a torn file, and a full
    disk is reported with the size of ``obj``'s tensors as the space needed."""

    def save(stream) -> None:
        torch.save(obj, stream)

    return atomic_write(path, save, size_hint=state_nbytes(obj), before_replace=before_replace)
