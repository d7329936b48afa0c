"""Pretraining entry point: ``python -m franca.train --config-file F --output-dir D [--no-resume] [key=value ...]``.

Owns the loop of valeoai/Franca ``franca/train/train.py``, ``do_train``: schedules → forward/backward →
per-submodule clipping → AdamW step → EMA teacher, with a progress line, ``training_metrics.json``, resumable
checkpoints every ``train.saveckp_freq`` epochs of ``train.OFFICIAL_EPOCH_LENGTH`` iterations (and on
SIGTERM/SIGUSR1), and release-format teacher exports.

The same command runs as one process, under ``torchrun`` or as SLURM tasks (:mod:`franca.distributed` detects which):
the model goes through :func:`franca.parallel.parallelize` (FSDP2 / DDP / compile / activation checkpointing), each
rank reads its slice of the world-size-independent global batch, logged losses are averaged over ranks, rank 0 alone
writes metrics, plots and teacher exports, and a stop signal on any rank leads every rank to one collective
checkpoint. KoLeo stays per rank (as the original ``franca/loss/koleo_loss.py``); the iBOT loss is normalised
per rank by the rank's 2B global crops (original ``franca/loss/mrl_ibot_patch_loss.py``), and gradients are averaged
over ranks, so it equals the single-process loss on the concatenated batch when the masks are the same.
"""

import argparse
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from franca.checkpoint import (
    LoadedCheckpoint,
    TrainingCheckpointer,
    UnreadableCheckpointError,
    latest_checkpoint,
    read_model_state,
    restore_rng_state,
    save_teacher_release,
)
from franca.checkpoint.distributed import load_model_weights
from franca.checkpoint.release import teacher_export_path
from franca.config import apply_scaling_rules, load_config, save_config
from franca.data.augmentations import DataAugmentationDINO
from franca.data.batched_augmentations import SplitDataAugmentationDINO, apply_photometric_to_batch
from franca.data.collate import MaskingCollator
from franca.data.datasets import WebDatasetShards
from franca.data.image_decoding import ImageDecoding
from franca.data.loaders import make_dataset, make_train_data_loader
from franca.data.masking import build_mask_generator
from franca.data.streams import make_webdataset_train_loader
from franca.distributed import (
    all_reduce_mean,
    any_rank,
    barrier,
    destroy_distributed,
    init_distributed,
    is_main_process,
    setup_rank_output,
)
from franca.parallel import parallelize
from franca.train.health import HealthMonitor, format_health, reduce_stats
from franca.train.knn_monitor import build_knn_monitor
from franca.train.param_groups import apply_optim_schedule, fuse_params_groups, get_params_groups
from franca.train.progress import announce_uniform_values, finished_run_note, format_losses, model_uniform_values
from franca.train.runtime import Runtime
from franca.train.schedules import build_schedules
from franca.train.ssl_meta_arch import SSLMetaArch
from franca.utils.atomic import sweep_stale_temporaries
from franca.utils.logging import MetricsWriter, Progress


class NonFiniteLossError(RuntimeError):
    pass


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("franca.train", description="Pretrain Franca (or the DINOv2 baseline).")
    parser.add_argument("--config-file", "--config_file", default=None, help="YAML recipe merged over the defaults")
    parser.add_argument("--output-dir", "--output_dir", required=True, help="where checkpoints and logs go")
    parser.add_argument("--no-resume", action="store_true", help="start fresh even if DIR has checkpoints")
    parser.add_argument("opts", nargs="*", default=[], help="config overrides, e.g. optim.epochs=10")
    return parser


def setup_run(args: argparse.Namespace) -> DictConfig:
    """Join the process group (if launched with several), build the config, write it (rank 0), route printing."""
    env, _ = init_distributed()
    cfg = load_config(args.config_file, list(args.opts))
    cfg.train.output_dir = str(args.output_dir)
    apply_scaling_rules(cfg, world_size=env.world_size)
    if env.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        sweep_run_folder(Path(args.output_dir), cfg.train.keep_checkpoints)
        save_config(cfg, Path(args.output_dir) / "config.yaml")
    barrier()
    setup_rank_output(args.output_dir, env.rank, env.world_size)
    return cfg


def sweep_run_folder(out_dir: Path, keep_checkpoints: int) -> None:
    """Rank 0, before any rank writes: remove what interrupted writes left in the run folder (a killed save's
    temporary can hold most of a disk, and would make the restarted run fail at once)."""
    removed = [*sweep_stale_temporaries(out_dir), *TrainingCheckpointer(out_dir, keep_checkpoints).sweep()]
    for folder in sorted((out_dir / "eval").glob("*/")):
        removed += sweep_stale_temporaries(folder)
    if removed:
        print(f"removed {len(removed)} leftover temporary file(s) of interrupted writes", flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(cfg: DictConfig, model: SSLMetaArch, device: torch.device) -> torch.optim.Optimizer:
    groups = []
    for module in model.student.values():
        groups += get_params_groups(
            module, layerwise_decay=cfg.optim.layerwise_decay, patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult
        )
    betas = (cfg.optim.adamw_beta1, cfg.optim.adamw_beta2)
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(fuse_params_groups(groups), betas=betas, **fast)


def build_transform(cfg: DictConfig, batched_photometric: bool):
    """The multi-crop transform of the loader workers: all of it per image, or its split worker half (original
    ``DataAugmentationDINO``; the photometric half then runs in :func:`prepare_batch`)."""
    augmentation = SplitDataAugmentationDINO if batched_photometric else DataAugmentationDINO
    return augmentation(
        cfg.crops.global_crops_scale,
        cfg.crops.local_crops_scale,
        cfg.crops.local_crops_number,
        global_crops_size=cfg.crops.global_crops_size,
        local_crops_size=cfg.crops.local_crops_size,
        blur_quirk=cfg.crops.blur_quirk,
    )


def build_collator(cfg: DictConfig, rank: int = 0, world_size: int = 1) -> MaskingCollator:
    """The masking collate of the config: iBOT masks (block / inverse block / CyclicMask roll) for the global grid."""
    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    return MaskingCollator(
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability,
        n_tokens=grid * grid,
        mask_generator=build_mask_generator(
            (grid, grid), cfg.train.use_block_masking, cfg.train.use_inverse_block, cfg.train.roll
        ),
        seed=cfg.train.seed,
        rank=rank,
        world_size=world_size,
    )


def build_data(
    cfg: DictConfig, start_iteration: int, rank: int = 0, world_size: int = 1, batched_photometric: bool = False
):
    """The dataset and the training loader (map-style or shards) with the multi-crop transform and masking collate;
    ``batched_photometric`` gives the split transform, whose batches :func:`prepare_batch` finishes."""
    transform = build_transform(cfg, batched_photometric)
    decoding = ImageDecoding.from_options(cfg.train.alpha_background, cfg.train.image_max_value)
    dataset = make_dataset(cfg.train.dataset_path, decoding=decoding)
    collate = build_collator(cfg, rank, world_size)
    make_loader = make_webdataset_train_loader if isinstance(dataset, WebDatasetShards) else make_train_data_loader
    loader = make_loader(
        dataset,
        transform,
        collate,
        batch_size_per_rank=cfg.train.batch_size_per_gpu,
        seed=cfg.train.seed,
        start_iteration=start_iteration,
        num_workers=cfg.train.num_workers,
        rank=rank,
        world_size=world_size,
    )
    return dataset, loader


def _describe_size(dataset) -> str:
    size = dataset.num_samples if isinstance(dataset, WebDatasetShards) else len(dataset)
    return "a stream of unknown length" if size is None else f"{size} images"


def move_batch(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def prepare_batch(batch: dict, runtime: Runtime) -> dict:
    """A loader batch on the runtime's device, ready for the step: with ``runtime.batched_photometric`` its uint8 crops
    get their drawn colour jitter, grayscale, blur, solarisation and normalisation there (the parameters stay on the
    CPU, which picks the rows without a device sync); float tensors in ``runtime.param_dtype`` (float64 for fp64)."""
    batch = move_batch(batch, runtime.device)
    if runtime.batched_photometric:
        batch = apply_photometric_to_batch(batch)
    if runtime.param_dtype == torch.float32:
        return batch
    dtype = runtime.param_dtype
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}


def load_pretrained(cfg: DictConfig, model: SSLMetaArch) -> None:
    source = cfg.student.pretrained_weights
    if not source:
        return
    from franca.hub import load_backbone

    backbone = load_backbone(source)
    model.load_pretrained_backbone(backbone.state_dict())
    print(f"initialised student and teacher backbones from {source} (heads are fresh)", flush=True)


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
    """Records SIGTERM/SIGUSR1 so the loop checkpoints at the end of the current iteration and exits."""

    def __init__(self):
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        print(f"received {signal.Signals(signum).name}: checkpointing after this iteration", flush=True)


class NonFiniteTracker:
    """Remembers, on the device and without a host sync, which loss terms went non-finite and since when.

    The trainer reads it at log and checkpoint iterations (:meth:`check`), so a bad step is reported with its term and
    first iteration, and no checkpoint is ever written after one.
    """

    def __init__(self):
        self.bad: dict[str, torch.Tensor] = {}
        self.first: torch.Tensor | None = None

    def update(self, losses: dict[str, torch.Tensor], iteration: int) -> None:
        for name, value in losses.items():
            flag = ~torch.isfinite(value)
            self.bad[name] = flag if name not in self.bad else self.bad[name] | flag
        any_bad = torch.stack(list(self.bad.values())).any()
        if self.first is None:
            self.first = torch.full((), -1, dtype=torch.long, device=any_bad.device)
        self.first = torch.where((self.first < 0) & any_bad, iteration, self.first)

    def check(self, losses: dict[str, float], iteration: int, checkpoint_dir: Path) -> None:
        bad = [name for name, flag in self.bad.items() if bool(flag)]
        if not any_rank(bool(bad)):
            return
        last = latest_checkpoint(checkpoint_dir)
        where = (
            f"{', '.join(f'{k}={losses.get(k)}' for k in bad)} since iteration {int(self.first)}"
            if bad
            else "on another rank"
        )
        raise NonFiniteLossError(
            f"non-finite loss by iteration {iteration}: {where}. The last good checkpoint is "
            f"{last or 'none (no checkpoint written yet)'}; lower optim.base_lr, raise optim.warmup_epochs, or use "
            "compute_precision.dtype=bf16/fp32, then restart the same command to resume"
        )


def export_teacher_collective(model: SSLMetaArch, out_dir: Path, done: int, block_chunks: int) -> Path:
    """Gather the full teacher (a collective under FSDP) and write its release-format export from rank 0, named by
    the iterations completed (``eval/training_<done>``, as the checkpoint ``model_<done>.pth`` beside it)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model.teacher, options=options)
    path = teacher_export_path(out_dir, done)
    if is_main_process():
        save_teacher_release(state, model.teacher["backbone"].build_config(), path, block_chunks)
    barrier()
    return path


def build_model(cfg: DictConfig, runtime: Runtime, world_size: int, local_world_size: int) -> SSLMetaArch:
    """The meta-architecture, initialised alike on every rank (same seed), on the device and parallelised."""
    seed_everything(cfg.train.seed)
    model = SSLMetaArch(cfg)
    load_pretrained(cfg, model)
    model.to(runtime.device, dtype=runtime.param_dtype)
    parallelize(model, cfg, runtime, world_size, local_world_size)
    model.train()
    return model


def do_train(cfg: DictConfig, resume: bool = True) -> dict:
    """Run (or resume) the training of ``cfg`` and return the last logged metrics (on every rank)."""
    out_dir = Path(cfg.train.output_dir)
    env, device = init_distributed()
    rank, world_size = env.rank, env.world_size
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    runtime = Runtime.resolve(cfg, device, world_size)
    model = build_model(cfg, runtime, world_size, env.local_world_size)
    seed_everything(cfg.train.seed + rank)
    optimizer = build_optimizer(cfg, model, device)
    use_scaler = runtime.autocast_dtype == torch.float16 and cfg.compute_precision.grad_scaler
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    schedules = build_schedules(cfg)
    epoch_length = cfg.train.OFFICIAL_EPOCH_LENGTH
    max_iter = cfg.optim.epochs * epoch_length
    ckpt_period = cfg.train.saveckp_freq * epoch_length
    eval_period = cfg.evaluation.eval_period_iterations
    block_chunks = cfg.student.block_chunks
    stop_at = cfg.train.stop_at_iteration or max_iter

    checkpointer = TrainingCheckpointer(out_dir, keep=cfg.train.keep_checkpoints)
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
        checkpointer.save(iteration, model, optimizer, scaler, OmegaConf.to_yaml(cfg))

    dataset, loader = build_data(cfg, start, rank, world_size, runtime.batched_photometric)
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
    images_per_iteration = cfg.train.batch_size_per_gpu * world_size
    progress = Progress("Training", max_iter, start)
    print(
        f"training {cfg.student.arch}/{cfg.student.patch_size} on {cfg.train.dataset_path} ({_describe_size(dataset)}) "
        f"for {max_iter} iterations, batch {cfg.train.batch_size_per_gpu} x {world_size} process(es), "
        f"lr {cfg.optim.lr:.3g}, {runtime.describe()}",
        flush=True,
    )
    uniform = model_uniform_values(model, world_size)
    if main_process:
        print(announce_uniform_values(uniform), flush=True)

    last_record: dict = {}
    nonfinite = NonFiniteTracker()
    monitor = HealthMonitor(
        cfg.train.health_entropy_threshold, cfg.train.health_min_cls_spread, cfg.train.health_patience
    )
    knn = build_knn_monitor(cfg, device, runtime.autocast_dtype, rank, world_size)
    if start == 0:  # the run's floor: the teacher at initialisation, exported and, with a k-NN, measured
        export_teacher_collective(model, out_dir, 0, block_chunks)
        if knn is not None:
            initial = {"iteration": -1, **knn.run(model.teacher["backbone"], 0, max_iter, main_process)}
            if main_process:
                metrics.write(initial)
    window_start, window_iters = time.perf_counter(), 0
    data_iter = iter(loader)
    for iteration in range(start, max_iter):
        t_data = time.perf_counter()
        batch = prepare_batch(next(data_iter), runtime)
        data_time = time.perf_counter() - t_data
        lr, wd = schedules["lr"][iteration], schedules["wd"][iteration]
        mom, teacher_temp = schedules["momentum"][iteration], schedules["teacher_temp"][iteration]
        apply_optim_schedule(optimizer, lr=lr, wd=wd, last_layer_lr=schedules["last_layer_lr"][iteration])

        done = iteration + 1
        knn_now = knn is not None and knn.due(done, max_iter)  # its accuracies go into this iteration's record
        log_now = done % cfg.train.log_period == 0 or done in (max_iter, stop_at, start + 1) or knn_now
        optimizer.zero_grad(set_to_none=True)
        step_stats: dict | None = {} if log_now else None
        losses = model.forward_backward(batch, teacher_temp, runtime, scaler, stats=step_stats)
        if scaler is not None:
            scaler.unscale_(optimizer)
        if cfg.optim.clip_grad:
            model.clip_gradients(cfg.optim.clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        model.update_teacher(mom)
        nonfinite.update(losses, iteration)
        window_iters += 1

        stopping = any_rank(stop.signal is not None) if world_size > 1 else stop.signal is not None
        planned_stop = done == stop_at and done != max_iter
        save_now = done % ckpt_period == 0 or done == max_iter or stopping or planned_stop
        if log_now or save_now:
            values = all_reduce_mean({k: float(v) for k, v in losses.items()})
            nonfinite.check(values, iteration, out_dir / "checkpoints")
        if log_now:
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - window_start
            iter_time = elapsed / window_iters
            record = {
                "iteration": iteration,
                "total_loss": sum(values.values()),
                **values,
                "lr": lr,
                "wd": wd,
                "mom": mom,
                "teacher_temp": teacher_temp,
                "iter_time": iter_time,
                "data_time": data_time,
            }
            health_values = reduce_stats(step_stats)
            record.update(health_values)
            if knn_now:
                record.update(knn.run(model.teacher["backbone"], done, max_iter, main_process))
            last_record = record
            warnings = monitor.update(health_values, iteration)
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
                    f"loss {record['total_loss']:.4f} ({format_losses(values, uniform)}) lr {lr:.2e} "
                    f"{images_per_iteration / iter_time:.1f} img/s{mem} | {format_health(health_values)}",
                )
            window_start, window_iters = time.perf_counter(), 0
        if eval_period and done % eval_period == 0 and done != max_iter:
            export_teacher_collective(model, out_dir, done, block_chunks)
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

    final = export_teacher_collective(model, out_dir, max_iter, block_chunks)
    print(f"teacher exported to {final}", flush=True)
    if main_process:
        if tb is not None:
            tb.close()
        _write_loss_plot(out_dir)
    return last_record


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def _write_loss_plot(out_dir: Path) -> None:
    from franca.utils.plots import plot_loss_curves

    try:
        path = plot_loss_curves(out_dir / "training_metrics.json", out_dir / "loss_curves.png")
        print(f"loss curves written to {path}", flush=True)
    except ImportError as err:
        print(f"no loss-curve PNG: {err}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    """Entry point for ``python -m franca.train``, torchrun workers and SLURM tasks alike."""
    args = get_args_parser().parse_args(argv)
    try:
        cfg = setup_run(args)
        return do_train(cfg, resume=not args.no_resume)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
