"""Resize a checkpoint's position-embedding grid for a new image size (high-resolution finetuning;
replaces valeoai/Franca ``scripts/modify_ckpt_highres.py``).

    python scripts/modify_ckpt_highres.py --checkpoint-path in.pth --output-path out.pth \\
        [--target-img-size 518] [--patch-size 14] [--pos-embed-key auto] [--interpolate-offset 0.1]

A ViT built for 518 px needs a [1, 1 + 37², D] ``pos_embed``; a 224 px checkpoint has [1, 1 + 16², D], and loading it
fails on the shape. This script finds every ``pos_embed`` tensor in the checkpoint (any wrapper: ``{"teacher":
{"backbone.pos_embed": ...}}``, flat keys, student and teacher copies, chunked block keys left untouched), resizes its
patch grid to target/patch per side and writes the whole checkpoint back, atomically.

The resize is the model's own run-time interpolation (``interpolate_pos_encoding``): bicubic, no antialiasing,
``scale_factor = (T + offset) / M`` in float32. So a model built at the target size with the new checkpoint gives
exactly the outputs the old model gives when run on target-size images. (The original script used ``size=`` with
``antialias=True``, which moves the sampling positions and smooths the grid, so the finetuned model starts from other
embeddings than the ones the source model used at that size.)

Only tensors are resized; an optimizer state kept in the checkpoint is not (restart the optimizer, as HRFT does).
"""

import argparse
import os
import sys
from pathlib import Path

import torch

from franca.models.weights import fit_pos_embed
from franca.utils.weight_files import UnreadableCheckpointError, atomic_torch_save, load_torch_file

AUTO = "auto"
POS_EMBED = "pos_embed"


def _is_pos_embed_key(key: object, wanted: str) -> bool:
    if not isinstance(key, str):
        return False
    if wanted == AUTO:
        return key == POS_EMBED or key.endswith("." + POS_EMBED)
    return key == wanted


def find_pos_embed_paths(tree: object, wanted: str = AUTO, prefix: tuple = ()) -> list[tuple]:
    """Paths (tuples of keys) to every position-embedding tensor in a nested dict/list checkpoint."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return []
    found = []
    for key, value in items:
        if isinstance(value, torch.Tensor):
            if _is_pos_embed_key(key, wanted):
                found.append(prefix + (key,))
        else:
            found.extend(find_pos_embed_paths(value, wanted, prefix + (key,)))
    return found


def _replace(tree: object, path: tuple, value: torch.Tensor) -> object:
    """A copy of ``tree`` with the leaf at ``path`` replaced (containers on the path are copied, tensors shared)."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(tree, dict):
        return {**tree, key: _replace(tree[key], rest, value)}
    items = list(tree)
    items[key] = _replace(items[key], rest, value)
    return type(tree)(items)


def _leaf(tree: object, path: tuple) -> torch.Tensor:
    for key in path:
        tree = tree[key]
    return tree


def modify_checkpoint(
    checkpoint: object,
    target_img_size: int,
    patch_size: int = 14,
    pos_embed_key: str = AUTO,
    interpolate_offset: float = 0.1,
) -> tuple[object, dict[str, tuple[tuple[int, ...], tuple[int, ...]]]]:
    """The checkpoint with every position grid resized for ``target_img_size``, and {path: (old shape, new shape)}."""
    if target_img_size <= 0 or target_img_size % patch_size:
        raise ValueError(
            f"--target-img-size {target_img_size} is not a positive multiple of --patch-size {patch_size}; use e.g. "
            f"{max(target_img_size // patch_size, 1) * patch_size}"
        )
    paths = find_pos_embed_paths(checkpoint, pos_embed_key)
    if not paths:
        what = (
            f"no key {pos_embed_key!r}" if pos_embed_key != AUTO else "no key named pos_embed or ending in .pos_embed"
        )
        raise KeyError(f"the checkpoint holds {what}; pass --pos-embed-key with the exact key of its position grid")
    changes = {}
    for path in paths:
        old = _leaf(checkpoint, path)
        new = fit_pos_embed(old, target_img_size // patch_size, interpolate_offset)
        checkpoint = _replace(checkpoint, path, new)
        changes["/".join(map(str, path))] = (tuple(old.shape), tuple(new.shape))
    return checkpoint, changes


def load_checkpoint(path: str | os.PathLike) -> object:
    """Read a checkpoint with ``weights_only=True`` (a pickle that would run code is refused;
    :func:`franca.utils.weight_files.load_torch_file`)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--checkpoint-path {path}: no such file")
    return load_torch_file(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint-path", required=True, help="input checkpoint (.pth)")
    parser.add_argument("--output-path", required=True, help="output checkpoint (.pth); may equal the input")
    parser.add_argument("--target-img-size", type=int, default=518, help="image size the model will be built for")
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument(
        "--pos-embed-key",
        default=AUTO,
        help="'auto': every key named pos_embed or ending in .pos_embed, at any depth; else one exact key name",
    )
    parser.add_argument(
        "--interpolate-offset",
        type=float,
        default=0.1,
        help="the model's interpolate_offset (0.1 for Franca/DINOv2 releases; 0 means size= interpolation)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        checkpoint = load_checkpoint(args.checkpoint_path)
        checkpoint, changes = modify_checkpoint(
            checkpoint, args.target_img_size, args.patch_size, args.pos_embed_key, args.interpolate_offset
        )
    except (FileNotFoundError, KeyError, ValueError, UnreadableCheckpointError) as err:
        parser.error(str(err.args[0]) if isinstance(err, KeyError) else str(err))
    atomic_torch_save(checkpoint, args.output_path)
    for path, (old, new) in changes.items():
        note = "unchanged (already this size)" if old == new else f"{list(old)} -> {list(new)}"
        print(f"{path}: {note}")
    print(f"wrote {args.output_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
