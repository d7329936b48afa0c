"""Consolidate a training checkpoint into release files, on one CPU process without a process group.

``python -m franca.checkpoint.consolidate RUN_DIR OUT [--iteration N]``

Reads the latest (or the given iteration's) checkpoint of ``RUN_DIR/checkpoints`` — a DCP folder written by any
number of ranks, or a single-process ``model_*.pth`` — and writes into the folder ``OUT``:

* ``teacher_checkpoint.pth``: the teacher in the release format ``{"teacher": ..., "backbone_config": ...}``
  (as the trainer's teacher exports), loadable by the hub and the original code;
* ``backbone/``: the teacher backbone as a safetensors folder (:mod:`franca.models.safetensors_folder`, the folder
  ``python -m franca.export.safetensors`` writes).

Only the teacher's tensors are read from a DCP folder (not the student nor the optimizer). Only checkpoints of the
folder's run (``run.json``, :mod:`franca.checkpoint.records`) are used, each checked against its recorded SHA-256
digests first. Without ``--iteration``, an unreadable newest checkpoint (truncated, empty, refused by the weights-only
reader, failing its digest check) is reported and the next older one is used; nothing in the run folder is changed.
The teacher is rebuilt with the config recorded with the checkpoint (else the one stored in a DCP folder, else the
run's ``config.yaml``).
"""

import argparse
import os
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from franca.checkpoint.distributed import (
    TRAIN_STATE_FILE,
    UnreadableCheckpointError,
    list_checkpoints,
    read_checkpoint_file,
    read_dcp_tensors,
    verify_checkpoint,
)
from franca.checkpoint.records import RecordError, read_record, read_run_id
from franca.checkpoint.release import save_teacher_release
from franca.data.image_decoding import training_decoding
from franca.models.config import ViTConfig
from franca.models.safetensors_folder import export_safetensors
from franca.models.vision_transformer import DinoVisionTransformer
from franca.models.weights import load_strict, split_prefix

TEACHER_PREFIX = "teacher."
BACKBONE_PREFIX = "backbone."


def find_checkpoints(run_dir: str | os.PathLike, iteration: int | None = None) -> list[Path]:
    """The checkpoints of ``run_dir``'s run to try, newest first (only the one saved to resume at ``iteration`` if
    given)."""
    found = [(it, path) for it, path in list_checkpoints(Path(run_dir) / "checkpoints") if _of_the_run(run_dir, path)]
    if not found:
        raise FileNotFoundError(f"no training checkpoint under {Path(run_dir) / 'checkpoints'}; is it a run dir?")
    if iteration is None:
        return [path for _, path in reversed(found)]
    matching = [path for it, path in found if it == iteration]
    if not matching:
        raise FileNotFoundError(
            f"no checkpoint for iteration {iteration} in {run_dir}; available: {', '.join(str(it) for it, _ in found)}"
        )
    return matching


def _of_the_run(run_dir: str | os.PathLike, checkpoint: Path) -> bool:
    """Whether ``checkpoint`` belongs to the run of ``run_dir`` (any checkpoint, in a folder without ``run.json``);
    one of another run is named on stderr."""
    run_id = read_run_id(run_dir)
    if run_id is None:
        return True
    try:
        record = read_record(checkpoint)
    except RecordError:
        return True  # damaged: reported when it is read
    if record is not None and record.run_id == run_id:
        return True
    print(f"skipping {checkpoint}: it is not a checkpoint of the run {run_id} of {run_dir}", file=sys.stderr)
    return False


def load_teacher_state(checkpoint: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str | None]:
    """The teacher ModuleDict state dict of a checkpoint, checked against its record, and the config YAML recorded
    or stored with it (None when neither has one)."""
    path = Path(checkpoint)
    record = verify_checkpoint(path, collective=False)
    recorded_yaml = OmegaConf.to_yaml(OmegaConf.create(record.config)) if record and record.config else None
    if path.is_dir():
        train_state = read_checkpoint_file(path / TRAIN_STATE_FILE)
        prefix = "model." + TEACHER_PREFIX
        teacher, _ = split_prefix(read_dcp_tensors(path, prefix), prefix)
        stored_yaml = recorded_yaml or train_state.get("config") or None
    else:
        state = read_checkpoint_file(path)
        model = state.get("model", {})
        teacher = {k[len(TEACHER_PREFIX) :]: v for k, v in model.items() if k.startswith(TEACHER_PREFIX)}
        stored_yaml = recorded_yaml or state.get("config") or None
    if not teacher:
        raise ValueError(f"checkpoint {path} holds no teacher weights; it is not a franca training checkpoint")
    return teacher, stored_yaml


def load_newest_teacher(
    run_dir: str | os.PathLike, iteration: int | None = None
) -> tuple[Path, dict[str, torch.Tensor], str | None]:
    """The first readable of :func:`find_checkpoints`, warning about each unreadable one; lists them all if none."""
    failures = []
    for path in find_checkpoints(run_dir, iteration):
        try:
            return (path, *load_teacher_state(path))
        except UnreadableCheckpointError as err:
            print(f"WARNING: {err}; trying the next older checkpoint", file=sys.stderr, flush=True)
            failures.append(f"  {path}: {err}")
    raise UnreadableCheckpointError("no readable checkpoint; tried, newest first:\n" + "\n".join(failures))


def _run_config(run_dir: Path, stored_yaml: str | None) -> DictConfig:
    if stored_yaml:
        return OmegaConf.create(stored_yaml)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run's config is needed to rebuild the teacher")
    return OmegaConf.load(path)


def build_teacher_backbone(
    cfg: DictConfig, teacher_state: dict[str, torch.Tensor], source: str
) -> DinoVisionTransformer:
    """The teacher backbone of a run (the trainer's ``cfg.student`` ViT at the global-crop size, no stochastic depth)
    with the checkpoint's ``backbone.*`` tensors loaded strictly; built from the models layer, so the checkpoint
    package needs nothing from ``franca.train`` (docs/architecture.md)."""
    config = ViTConfig.from_student_config(cfg.student, img_size=cfg.crops.global_crops_size, drop_path=False)
    backbone = DinoVisionTransformer(config)
    backbone.input_decoding = training_decoding(cfg).to_record()
    state = {k[len(BACKBONE_PREFIX) :]: v for k, v in teacher_state.items() if k.startswith(BACKBONE_PREFIX)}
    hint = "the run's config.yaml must be the one the checkpoint was trained with"
    load_strict(backbone, state, source, "the teacher backbone of the run's config", hint)
    return backbone


def consolidate(run_dir: str | os.PathLike, out_dir: str | os.PathLike, iteration: int | None = None) -> Path:
    """Write ``OUT/teacher_checkpoint.pth`` and ``OUT/backbone/`` from a checkpoint of ``run_dir``; returns OUT."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    checkpoint, state, stored_yaml = load_newest_teacher(run_dir, iteration)
    cfg = _run_config(run_dir, stored_yaml)
    backbone = build_teacher_backbone(cfg, state, str(checkpoint))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_teacher_release(state, backbone.build_config(), out_dir / "teacher_checkpoint.pth", cfg.student.block_chunks)
    export_safetensors(backbone, out_dir / "backbone")
    print(f"consolidated {checkpoint} into {out_dir / 'teacher_checkpoint.pth'} and {out_dir / 'backbone'}")
    return out_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m franca.checkpoint.consolidate", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="the training run's --output-dir")
    parser.add_argument("out", help="folder for teacher_checkpoint.pth and backbone/")
    parser.add_argument("--iteration", type=int, default=None, help="checkpoint to use (default: the latest)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        consolidate(args.run_dir, args.out, args.iteration)
    except (FileNotFoundError, ValueError, UnreadableCheckpointError) as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
