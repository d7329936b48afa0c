"""Single-process resumable checkpoints, written atomically, the last few kept.

A checkpoint holds the model (student, teacher, loss buffers), optimizer, grad scaler, the iteration to resume at and
every RNG state (Python, NumPy, torch CPU and CUDA), so a killed run restarted from it continues bit-for-bit: the data
order and augmentations are functions of (seed, iteration) and need no state of their own.
Everything is stored as tensors and plain Python values, so it loads with ``torch.load(weights_only=True)``.
"""

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_PATTERN = re.compile(r"^model_(\d{7})\.pth$")


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def capture_rng_state() -> dict:
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """``<output_dir>/checkpoints/model_<iteration:07d>.pth`` plus a ``last_checkpoint`` pointer file."""

    def __init__(self, output_dir: str | os.PathLike, keep: int = 2):
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep}")
        self.dir = Path(output_dir) / "checkpoints"
        self.keep = keep

    def save(self, iteration: int, **state) -> Path:
        """Save the state to resume at ``iteration`` (the next iteration to run)."""
        path = self.dir / f"model_{iteration:07d}.pth"
        atomic_torch_save({"iteration": iteration, "rng": capture_rng_state(), **state}, path)
        tmp = self.dir / ".last_checkpoint.tmp"
        tmp.write_text(path.name)
        os.replace(tmp, self.dir / "last_checkpoint")
        for old in self.list()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def list(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if CHECKPOINT_PATTERN.match(p.name))

    def last(self) -> Path | None:
        pointer = self.dir / "last_checkpoint"
        if pointer.is_file():
            path = self.dir / pointer.read_text().strip()
            if path.is_file():
                return path
        found = self.list()
        return found[-1] if found else None

    def load(self, path: str | os.PathLike | None = None) -> dict | None:
        path = Path(path) if path is not None else self.last()
        if path is None:
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise RuntimeError(
                f"cannot read checkpoint {path}: {err}. Delete it to resume from an older one, or start fresh with "
                "--no-resume"
            ) from err
