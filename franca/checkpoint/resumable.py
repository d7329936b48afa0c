"""What a resumable checkpoint holds, and how a single-process one is written.

A checkpoint holds the model (student, teacher, loss buffers), optimizer, grad scaler, the iteration to resume at and
every RNG state (Python, NumPy, torch CPU and CUDA), so a killed run restarted from it continues bit-for-bit: the data
order and augmentations are functions of (seed, iteration) and need no state of their own.
Everything is stored as tensors and plain Python values, so it loads with ``torch.load(weights_only=True)``.
"""

import random
import re

import numpy as np
import torch

CHECKPOINT_PATTERN = re.compile(r"^model_(\d{7})\.pth$")


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
