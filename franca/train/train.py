"""Pretraining entry point: ``python -m franca.train --config-file F --output-dir D [--no-resume] [key=value ...]``.

Owns the loop of valeoai/Franca ``franca/train/train.py``, ``do_train``: one :class:`franca.train.step.TrainStep`
per iteration (schedules → forward/backward → per-submodule clipping → AdamW step → EMA teacher) on batches of
:func:`franca.train.build.build_data`, with a progress line, ``training_metrics.json``, resumable checkpoints every
``train.saveckp_freq`` epochs of ``train.OFFICIAL_EPOCH_LENGTH`` iterations (and on SIGTERM/SIGUSR1), and
release-format teacher exports.

The same command runs as one process, under ``torchrun`` or as SLURM tasks (:mod:`franca.distributed` detects which):
the model goes through :func:`franca.train.parallel.parallelize` (FSDP2 / DDP / compile / activation checkpointing),
each rank reads its slice of the world-size-independent global batch, logged losses are averaged over ranks, rank 0
alone writes metrics, plots and teacher exports, and a stop signal on any rank leads every rank to one collective
checkpoint. KoLeo stays per rank (as the original ``franca/loss/koleo_loss.py``); the iBOT loss is normalised
per rank by the rank's 2B global crops (original ``franca/loss/mrl_ibot_patch_loss.py``), and gradients are averaged
over ranks, so it equals the single-process loss on the concatenated batch when the masks are the same.
"""

import argparse
import signal
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from franca.checkpoint import (
    LoadedCheckpoint,
    TrainingCheckpointer,
    UnreadableCheckpointError,
    read_model_state,
    restore_rng_state,
    save_teacher_release,
)
from franca.checkpoint.distributed import load_model_weights
from franca.checkpoint.release import teacher_export_path
from franca.distributed import (
    all_reduce_mean,
    any_rank,
    barrier,
    destroy_distributed,
    init_distributed,
    is_main_process,
    setup_rank_output,
)
from franca.distributed.launcher_watch import stop_with_launcher
from franca.train.build import (
    build_data,
    build_model,
    build_train_step,
    describe_dataset_size,
    prepare_batch,
    seed_everything,
)
from franca.train.config import TRAINING_CONFIG, CommandConfig, apply_scaling_rules
from franca.train.drift import DriftMonitor, format_drift
from franca.train.health import HealthMonitor, format_health, reduce_stats
from franca.train.knn_monitor import build_knn_monitor
from franca.train.nonfinite import NonFiniteTracker
from franca.train.pretrained import PretrainedWeights, load_pretrained, resolve_pretrained
from franca.train.progress import announce_uniform_values, finished_run_note, format_losses, model_uniform_values
from franca.train.run_folder import lock_run_folder, open_run, release_run_folders, run_identity
from franca.train.runtime import Runtime
from franca.train.ssl_meta_arch import SSLMetaArch
from franca.utils.atomic import sweep_stale_temporaries
from franca.utils.cli import run_command
from franca.utils.logging import MetricsWriter, Progress


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("franca.train", description="Pretrain Franca (or the DINOv2 baseline).")
    parser.add_argument("--config-file", "--config_file", default=None, help="YAML recipe merged over the defaults")
    parser.add_argument("--output-dir", "--output_dir", required=True, help="where checkpoints and logs go")
    parser.add_argument(
        "--no-resume", action="store_true", help="start a new run; the previous run's outputs move to previous_runs/"
    )
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume although model-shaping config keys changed (recorded in DIR/run.json)",
    )
    parser.add_argument("opts", nargs="*", default=[], help="config overrides, e.g. optim.epochs=10")
    return parser


def setup_run(
    args: argparse.Namespace, command: CommandConfig = TRAINING_CONFIG
) -> tuple[DictConfig, PretrainedWeights | None]:
    """Join the process group (if launched with several), route printing, build the config (completed from
    ``student.pretrained_weights``, which is read here once), write it (rank 0); returns it and the read weights.

    ``command``: the config of the command that runs this trainer (training's, or ``python -m franca.distill``'s)."""
    env, _ = init_distributed()
    stop_with_launcher()
    overrides = list(args.opts)
    cfg = command.load(args.config_file, overrides)
    cfg.train.output_dir = str(args.output_dir)
    lock_run_folder(args.output_dir, start_over=args.no_resume)
    if env.is_main_process:
        sweep_run_folder(Path(args.output_dir), cfg.train.keep_checkpoints)
    barrier()
    setup_rank_output(args.output_dir, env.rank, env.world_size)
    pretrained = resolve_pretrained(cfg, command.schema.explicit_keys(args.config_file, overrides))
    command.validate(cfg)
    apply_scaling_rules(cfg, world_size=env.world_size)
    open_run(cfg, env.world_size, resume=not args.no_resume, allow_config_change=args.allow_config_change)
    barrier()
    return cfg, pretrained


def sweep_run_folder(out_dir: Path, keep_checkpoints: int) -> None:
    """Rank 0, before any rank writes: remove what interrupted writes left in the run folder (a killed save's
    temporary can hold most of a disk, and would make the restarted run fail at once)."""
    removed = [*sweep_stale_temporaries(out_dir), *TrainingCheckpointer(out_dir, keep_checkpoints).sweep()]
    for folder in sorted((out_dir / "eval").glob("*/")):
        removed += sweep_stale_temporaries(folder)
    if removed:
        print(f"removed {len(removed)} leftover temporary file(s) of interrupted writes", flush=True)


def load_initial_weights(
    cfg: DictConfig, checkpointer: TrainingCheckpointer, model: SSLMetaArch, optimizer: torch.optim.Optimizer
) -> LoadedCheckpoint | None:
    """``MODEL.WEIGHTS``: the training checkpoint a run without checkpoints of its own starts from (training.md).

    By default the whole state is taken (model, optimizer, iteration, random states): the run continues that one in a
    new folder. With ``train.high_resolution_finetune`` only the model (student, teacher, heads) is taken, position
    grids resized to ``crops.global_crops_size``, and training restarts at iteration 0 with a fresh optimizer
    (None is returned).
    """
    source = cfg.MODEL.WEIGHTS
    if not source:
        return None
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"MODEL.WEIGHTS={source!r} does not exist; give a franca training checkpoint (a model_*.pth file or a "
            "dcp_* folder from <run>/checkpoints), or '' to start from scratch"
        )
    try:
        if cfg.train.high_resolution_finetune:
            state, iteration = read_model_state(path)
            load_model_weights(model, state, path)
            print(
                f"initialised the model from MODEL.WEIGHTS={path} (its iteration {iteration}); "
                "train.high_resolution_finetune: restarting at iteration 0 with a fresh optimizer",
                flush=True,
            )
            return None
        loaded = checkpointer.load(path, model, optimizer)
    except UnreadableCheckpointError as err:
        raise UnreadableCheckpointError(f"MODEL.WEIGHTS: {err}") from err
    print(f"continuing from MODEL.WEIGHTS={path} at iteration {loaded.iteration}", flush=True)
    return loaded


class StopRequest:
    """Records SIGTERM/SIGUSR1/SIGINT so the loop checkpoints at the end of the current iteration and exits; a second
    Ctrl-C (SIGINT) stops at once."""

    def __init__(self):
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"received {signal.Signals(signum).name}: checkpointing after this iteration", flush=True)


def export_release_collective(model: SSLMetaArch, out_dir: Path, done: int, block_chunks: int) -> Path:
    """Gather the full teacher (a collective under FSDP) and write its release-format export from rank 0, named by
    the iterations completed (``eval/training_<done>``, as the checkpoint ``model_<done>.pth`` beside it)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model.export_modules, options=options)
    path = teacher_export_path(out_dir, done)
    if is_main_process():
        save_teacher_release(state, model.export_modules["backbone"].build_config(), path, block_chunks)
    barrier()
    return path


def do_train(
    cfg: DictConfig,
    resume: bool = True,
    meta_arch: Callable[[DictConfig], SSLMetaArch] = SSLMetaArch,
    pretrained: PretrainedWeights | None = None,
) -> dict:
    """Run (or resume) the training of ``cfg`` and return the last logged metrics (on every rank).

    ``meta_arch(cfg)`` builds the model: Franca's :class:`SSLMetaArch`, or another with its interface (``student`` /
    ``teacher`` module dicts, ``forward_backward``, ``clip_gradients``, ``update_teacher``, ``export_modules``).
    ``pretrained``: ``student.pretrained_weights`` already read by :func:`setup_run` (read again when None)."""
    out_dir = Path(cfg.train.output_dir)
    env, device = init_distributed()
    rank, world_size = env.rank, env.world_size
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    runtime = Runtime.resolve(cfg, device, world_size)
    initialise = partial(load_pretrained, cfg, weights=pretrained)
    model = build_model(cfg, runtime, world_size, env.local_world_size, initialise=initialise, meta_arch=meta_arch)
    drift = DriftMonitor.for_run(cfg, model.export_modules["backbone"], device, runtime.autocast_dtype)
    seed_everything(cfg.train.seed + rank)
    step = build_train_step(cfg, model, runtime)
    optimizer, scaler = step.optimizer, step.scaler
    epoch_length = cfg.train.OFFICIAL_EPOCH_LENGTH
    max_iter = cfg.optim.epochs * epoch_length
    ckpt_period = cfg.train.saveckp_freq * epoch_length
    eval_period = cfg.evaluation.eval_period_iterations
    block_chunks = cfg.student.block_chunks
    stop_at = cfg.train.stop_at_iteration or max_iter

    checkpointer = TrainingCheckpointer(out_dir, keep=cfg.train.keep_checkpoints, run=run_identity(out_dir))
    start = 0
    loaded = checkpointer.resume(model, optimizer) if resume else None
    if loaded is not None:
        print(f"resuming from {loaded.path} at iteration {loaded.iteration}", flush=True)
        if cfg.MODEL.WEIGHTS:
            print(f"MODEL.WEIGHTS={cfg.MODEL.WEIGHTS} is not read: the run resumes from its own checkpoint", flush=True)
    else:
        loaded = load_initial_weights(cfg, checkpointer, model, optimizer)
    if loaded is not None:
        if scaler is not None and loaded.scaler is not None:
            scaler.load_state_dict(loaded.scaler)
        start = loaded.iteration
    if start >= stop_at and stop_at < max_iter:
        print(f"train.stop_at_iteration={stop_at}: the run is already at iteration {start}; nothing to do", flush=True)
        return {}
    if start >= max_iter and teacher_export_path(out_dir, max_iter).is_file():
        print(finished_run_note(out_dir, max_iter), flush=True)
        return {}

    def save(iteration: int) -> None:
        backbone_config = model.export_modules["backbone"].build_config()
        checkpointer.save(iteration, model, optimizer, scaler, OmegaConf.to_yaml(cfg), backbone_config)

    accumulation = cfg.train.grad_accumulation_steps  # loader batches per iteration
    dataset, loader = build_data(cfg, start * accumulation, rank, world_size, runtime.batched_photometric)
    if loaded is not None and loaded.rng is not None:
        restore_rng_state(loaded.rng)
    elif loaded is not None:
        seed_everything(cfg.train.seed + rank + start * world_size)
        print(
            f"checkpoint saved by {loaded.saved_world_size} process(es), resumed by {world_size}: random states "
            f"(stochastic depth) are reseeded with train.seed + rank + iteration * world_size",
            flush=True,
        )
    main_process = is_main_process()
    metrics = MetricsWriter(out_dir / "training_metrics.json", resume_iteration=start) if main_process else None
    tb = _tensorboard(out_dir) if main_process else None
    stop = StopRequest()
    images_per_iteration = cfg.train.batch_size_per_gpu * world_size * accumulation
    progress = Progress("Training", max_iter, start)
    micro = f" x {accumulation} accumulated" if accumulation > 1 else ""
    print(
        f"training {model.export_modules['backbone'].config.label} on {cfg.train.dataset_path} "
        f"({describe_dataset_size(dataset)}) "
        f"for {max_iter} iterations, batch {cfg.train.batch_size_per_gpu} x {world_size} process(es){micro}, "
        f"lr {cfg.optim.lr:.3g}, {runtime.describe()}",
        flush=True,
    )
    uniform = model_uniform_values(model, world_size)
    if main_process and uniform:
        print(announce_uniform_values(uniform), flush=True)
    stage_two = cfg.train.freeze_backbone_iterations
    if main_process and stage_two:
        print(
            f"stage 1: heads only for {stage_two} iterations (backbone frozen), then the backbone joins at "
            f"{cfg.optim.backbone_lr_mult:g} x the lr over a {cfg.optim.backbone_warmup_iterations}-iteration ramp",
            flush=True,
        )

    last_record: dict = {}
    nonfinite = NonFiniteTracker()
    monitor = HealthMonitor(
        cfg.train.health_entropy_threshold, cfg.train.health_min_cls_spread, cfg.train.health_patience
    )
    knn = build_knn_monitor(cfg, device, runtime.autocast_dtype, rank, world_size)
    if start == 0:  # the run's floor: the teacher at initialisation, exported and, with a k-NN, measured
        export_release_collective(model, out_dir, 0, block_chunks)
        if knn is not None:
            initial = {"iteration": -1, **knn.run(model.teacher["backbone"], 0, max_iter, main_process)}
            if main_process:
                metrics.write(initial)
    window_start, window_iters = time.perf_counter(), 0
    data_iter = iter(loader)
    for iteration in range(start, max_iter):
        if main_process and stage_two and iteration == stage_two:
            print(f"stage 2 from iteration {iteration + 1}: the backbone trains (its lr ramps in)", flush=True)
        t_data = time.perf_counter()
        batches = [prepare_batch(next(data_iter), runtime) for _ in range(accumulation)]
        data_time = time.perf_counter() - t_data

        done = iteration + 1
        knn_now = knn is not None and knn.due(done, max_iter)  # its accuracies go into this iteration's record
        log_now = done % cfg.train.log_period == 0 or done in (max_iter, stop_at, start + 1) or knn_now
        step_stats: dict | None = {} if log_now else None
        losses = step(batches if accumulation > 1 else batches[0], iteration, stats=step_stats)
        nonfinite.update(losses, iteration)
        window_iters += 1

        stopping = any_rank(stop.signal is not None) if world_size > 1 else stop.signal is not None
        planned_stop = done == stop_at and done != max_iter
        save_now = done % ckpt_period == 0 or done == max_iter or stopping or planned_stop
        if log_now or save_now:
            values = all_reduce_mean({k: float(v) for k, v in losses.items()})
            nonfinite.check(values, iteration, checkpointer)
        if log_now:
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - window_start
            iter_time = elapsed / window_iters
            schedule_values = step.schedule_values(iteration)
            record = {
                "iteration": iteration,
                "total_loss": sum(values.values()),
                **values,
                **schedule_values,
                "iter_time": iter_time,
                "data_time": data_time,
            }
            health_values = reduce_stats(step_stats)
            record.update(health_values)
            drift_values = drift.measure(model.export_modules["backbone"]) if drift is not None else {}
            record.update(drift_values)
            if knn_now:
                record.update(knn.run(model.export_modules["backbone"], done, max_iter, main_process))
            last_record = record
            warnings = monitor.update(health_values, iteration)
            warnings += drift.update(drift_values, iteration) if drift is not None else []
            if main_process:  # the statistics are global: one warning for the run, not one per rank
                for warning in warnings:
                    print(f"WARNING: {warning}", flush=True)
            if main_process:
                metrics.write(record)
                if tb is not None:
                    for k, v in record.items():
                        tb.add_scalar(k, v, iteration)
                mem = f" mem {torch.cuda.max_memory_allocated() / 2**30:.1f}GiB" if device.type == "cuda" else ""
                progress.print(
                    done,
                    f"loss {record['total_loss']:.4f} ({format_losses(values, uniform)}) "
                    f"lr {schedule_values['lr']:.2e} {images_per_iteration / iter_time:.1f} img/s{mem} | "
                    f"{format_health(health_values)}" + format_drift(drift_values),
                )
            window_start, window_iters = time.perf_counter(), 0
        if eval_period and done % eval_period == 0 and done != max_iter:
            export_release_collective(model, out_dir, done, block_chunks)
        if save_now:
            save(done)
        if stopping and done != max_iter:
            print(f"stopped at iteration {done}; run the same command again to resume", flush=True)
            raise SystemExit(128 + (stop.signal or signal.SIGTERM))
        if planned_stop:
            print(
                f"stopped at iteration {done} (train.stop_at_iteration); run again with a later value, or 0, to "
                "continue",
                flush=True,
            )
            return last_record

    final = export_release_collective(model, out_dir, max_iter, block_chunks)
    print(f"teacher exported to {final}", flush=True)
    if main_process:
        if tb is not None:
            tb.close()
        _write_loss_plot(out_dir, uniform)
    return last_record


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def _write_loss_plot(out_dir: Path, uniform: dict[str, float]) -> None:
    from franca.utils.plots import plot_loss_curves

    try:
        path = plot_loss_curves(out_dir / "training_metrics.json", out_dir / "loss_curves.png", uniform)
        print(f"loss curves written to {path}", flush=True)
    except ImportError as err:
        print(f"no loss-curve PNG: {err}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    """Entry point for ``python -m franca.train``, torchrun workers and SLURM tasks alike."""
    args = get_args_parser().parse_args(argv)
    try:
        cfg, pretrained = setup_run(args)
        return do_train(cfg, resume=not args.no_resume, pretrained=pretrained)
    finally:
        release_run_folders()
        destroy_distributed()


if __name__ == "__main__":
    run_command(main)
