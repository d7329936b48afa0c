"""Distillation entry point: ``python -m franca.distill --config-file F --output-dir D [--no-resume] [key=value ...]``.

The Franca trainer (:func:`franca.train.train.do_train`) with a distillation meta-architecture: the same checkpoints
and exact resume, ``torchrun`` / SLURM / FSDP2, progress line, health monitor, periodic k-NN, loss plot. The teacher
(``teacher.weights``) is loaded on every process before the model is built; the mode (with the teacher's heads, or
head-free) is chosen from what the teacher file holds (``distill.mode``) and printed. The student is exported like a
Franca teacher, ``D/eval/training_<iteration>/teacher_checkpoint.pth`` with its ``backbone_config``, which every hub
loader, evaluation command and export reads (training.md, "Distil").
"""

from functools import partial

from franca.checkpoint import teacher_export_path
from franca.distill.teacher import load_teacher
from franca.distributed import destroy_distributed
from franca.train import train as trainer
from franca.train.distill_config import DISTILL_CONFIG
from franca.train.distill_meta_arch import build_distill_meta_arch, choose_mode
from franca.utils.cli import run_command

MODE_DESCRIPTIONS = {
    "heads": "the student learns the teacher's Sinkhorn-Knopp targets (DINO at every level, iBOT on masked patches)",
    "features": "the student matches the teacher's CLS and patch features",
}


def describe(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count >= 1e5 else f"{count / 1e3:.1f}k"


def main(argv: list[str] | None = None) -> dict:
    parser = trainer.get_args_parser()
    parser.prog = "franca.distill"
    parser.description = "Distil a frozen teacher into a small ViT or timm student."
    args = parser.parse_args(argv)
    try:
        cfg, pretrained = trainer.setup_run(args, DISTILL_CONFIG)
        teacher = load_teacher(cfg)
        mode = choose_mode(cfg.distill.mode, teacher)
        reason = "its file has DINO/iBOT heads" if teacher.has_heads else "its file has no heads"
        teacher_params = sum(p.numel() for p in teacher.modules["backbone"].parameters())
        print(
            f"distillation mode: {mode} ({MODE_DESCRIPTIONS[mode]}; distill.mode={cfg.distill.mode}, {reason}); "
            f"teacher {teacher.source}: {describe(teacher_params)} backbone parameters, width {teacher.width}",
            flush=True,
        )
        build = partial(build_distill_meta_arch, teacher=teacher, mode=mode)
        record = trainer.do_train(cfg, resume=not args.no_resume, meta_arch=build, pretrained=pretrained)
        final = teacher_export_path(cfg.train.output_dir, cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH)
        if final.is_file():
            print(f"the student ({cfg.student.arch}) is the export {final}", flush=True)
        return record
    finally:
        trainer.release_run_folders()
        destroy_distributed()


if __name__ == "__main__":
    run_command(main)
