"""The teacher in the release format: ``{"teacher": {"backbone.<key>", "dino_head.<key>", "ibot_head.<key>"}}``.

Backbone keys use the released chunked naming (``blocks.{c}.{i}.``) so a file we write loads in the original code as
well as in our hub (the original ``do_train`` writes ``{"teacher": state_dict}``). Beside ``teacher`` we store
``backbone_config`` (the ViT constructor keywords): the original loaders ignore it, and our hub uses it to rebuild
models whose head count the weights cannot tell (any non-standard width).
"""

import os
from pathlib import Path

import torch

from franca.models.weights import split_prefix, to_release
from franca.utils.weight_files import atomic_torch_save


def release_state_dict_from(teacher_state: dict[str, torch.Tensor], block_chunks: int = 4) -> dict[str, torch.Tensor]:
    """Release keys from a teacher ModuleDict state dict (``backbone.<flat key>``, ``dino_head.<key>``, ...)."""
    backbone, heads = split_prefix(teacher_state, "backbone.")
    state = to_release(backbone, block_chunks=block_chunks, prefix="backbone.")
    state.update(heads)
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def save_teacher_release(
    teacher_state: dict[str, torch.Tensor], backbone_config: dict, path: str | os.PathLike, block_chunks: int = 4
) -> Path:
    """Write ``{"teacher": release keys, "backbone_config": ...}`` to ``path`` atomically and return it."""
    path = Path(path)
    atomic_torch_save(
        {"teacher": release_state_dict_from(teacher_state, block_chunks), "backbone_config": backbone_config}, path
    )
    return path


def teacher_export_path(output_dir: str | os.PathLike, iteration: int) -> Path:
    return Path(output_dir) / "eval" / f"training_{iteration}" / "teacher_checkpoint.pth"
