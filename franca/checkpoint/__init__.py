"""Resumable training checkpoints (one file, or DCP folders at any world size) and release-format teacher exports."""

from franca.checkpoint.distributed import LoadedCheckpoint, TrainingCheckpointer, latest_checkpoint, list_checkpoints
from franca.checkpoint.release import (
    export_teacher,
    release_state_dict_from,
    save_teacher_release,
    teacher_export_path,
    teacher_release_state_dict,
)
from franca.checkpoint.resumable import Checkpointer, atomic_torch_save, capture_rng_state, restore_rng_state

__all__ = [
    "Checkpointer",
    "LoadedCheckpoint",
    "TrainingCheckpointer",
    "atomic_torch_save",
    "capture_rng_state",
    "export_teacher",
    "latest_checkpoint",
    "list_checkpoints",
    "release_state_dict_from",
    "restore_rng_state",
    "save_teacher_release",
    "teacher_export_path",
    "teacher_release_state_dict",
]
