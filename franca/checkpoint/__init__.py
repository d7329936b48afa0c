"""Resumable training checkpoints and release-format teacher exports."""

from franca.checkpoint.release import export_teacher, teacher_release_state_dict
from franca.checkpoint.resumable import Checkpointer, atomic_torch_save, capture_rng_state, restore_rng_state

__all__ = [
    "Checkpointer",
    "atomic_torch_save",
    "capture_rng_state",
    "export_teacher",
    "restore_rng_state",
    "teacher_release_state_dict",
]
