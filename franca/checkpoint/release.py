"""The teacher in the release format: ``{"teacher": {"backbone.<key>", "dino_head.<key>", "ibot_head.<key>"}}``.

Backbone keys use the released chunked naming (``blocks.{c}.{i}.``) so a file we write loads in the original code as
well as in our hub (reference §2.6, §4.2 step 6). Beside ``teacher`` we store ``backbone_config`` (the ViT constructor
keywords): the original loaders ignore it, and our hub uses it to rebuild models whose head count the weights cannot
tell (any non-standard width).
"""

import os
from pathlib import Path

import torch
from torch import nn

from franca.checkpoint.resumable import atomic_torch_save
from franca.hub.keys import to_release_state_dict


def teacher_release_state_dict(teacher: nn.ModuleDict, block_chunks: int = 4) -> dict[str, torch.Tensor]:
    state = to_release_state_dict(teacher["backbone"].state_dict(), block_chunks=block_chunks, prefix="backbone.")
    for name, module in teacher.items():
        if name != "backbone":
            state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def export_teacher(
    teacher: nn.ModuleDict, output_dir: str | os.PathLike, iteration: int, block_chunks: int = 4
) -> Path:
    """Write ``<output_dir>/eval/training_<iteration>/teacher_checkpoint.pth`` atomically and return its path."""
    path = Path(output_dir) / "eval" / f"training_{iteration}" / "teacher_checkpoint.pth"
    state = teacher_release_state_dict(teacher, block_chunks)
    atomic_torch_save({"teacher": state, "backbone_config": teacher["backbone"].build_config()}, path)
    return path
