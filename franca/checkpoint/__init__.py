"""Resumable training checkpoints (one file, or DCP folders at any world size) and release-format teacher exports."""

from franca.checkpoint.distributed import (
    CheckpointMismatchError,
    LoadedCheckpoint,
    TrainingCheckpointer,
    latest_checkpoint,
    list_checkpoints,
    read_model_state,
)
from franca.checkpoint.release import (
    release_state_dict_from,
    save_teacher_release,
    teacher_export_path,
)
from franca.checkpoint.resumable import capture_rng_state, restore_rng_state
from franca.utils.weight_files import UnreadableCheckpointError

__all__ = [
    "CheckpointMismatchError",
    "LoadedCheckpoint",
    "TrainingCheckpointer",
    "UnreadableCheckpointError",
    "capture_rng_state",
    "latest_checkpoint",
    "list_checkpoints",
    "read_model_state",
    "release_state_dict_from",
    "restore_rng_state",
    "save_teacher_release",
    "teacher_export_path",
]
