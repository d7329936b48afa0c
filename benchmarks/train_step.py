"""Training-step throughput, FLOPs, MFU, peak memory and a time breakdown of the full Franca step.

One step is the trainer's own :class:`franca.train.step.TrainStep` (built by ``franca.train.build.build_train_step``):
schedules applied to the param groups, ``SSLMetaArch.forward_backward`` under autocast (teacher + student backbones,
five-level Matryoshka DINO and iBOT heads, Sinkhorn-Knopp, KoLeo), per-submodule gradient clipping, AdamW and the EMA
teacher update. One "img" is one image with 2×224² + 8×98² crops.

- Data: ``synthetic`` batches have the collated format of the trainer (``collated_global_crops`` [2B,3,224,224],
  ``collated_local_crops`` [8B,3,98,98], masks drawn by the real ``MaskingCollator``, so the masked-token count is
  realistic; a new mask set each step, cycling over 8); ``loader`` runs the trainer's data loader on ``--dataset``
  with ``--num-workers`` (the step time then includes waiting for data, and, with ``crops.batched_photometric``
  resolved true, the photometric ops on the device, as in the trainer).
- FLOPs per step: ``torch.utils.flop_counter.FlopCounterMode`` on one real eager step (forward + backward). It counts
  matmul, convolution and scaled-dot-product-attention FLOPs only (elementwise, norms, softmax, Sinkhorn and the
  optimizer are not counted); the CPU attention kernel is added to its table so CPU counts include attention.
- MFU = FLOPs per step / mean step time / the measured dense ``--peak-size``³ matmul rate in the autocast dtype.
- Peak memory: ``torch.cuda.max_memory_allocated`` over the timed steps (CUDA only).
- ``--breakdown``: the same step with device marks from the library's phase hook (``forward_backward(...,
  on_phase=...)``, ``franca.train.step.TRAIN_STEP_PHASES``) after teacher backbone, teacher heads + targets,
  student backbones, student heads + losses and backward, then after clip + AdamW + EMA, averaged over ``--steps``
  steps; and the counted FLOPs of each phase (one eager instrumented step under ``FlopCounterMode``; they sum to the
  FLOPs per step).
- ``--compile``: ``torch.compile`` on every transformer block of both backbones
  (``franca.train.parallel.apply_compile``: one graph per crop resolution and batch size); it sets
  ``compute_precision.compile``, as ``--dtype`` sets ``compute_precision.dtype``, and the run's settings are resolved
  once into the trainer's ``Runtime``.
- The override ``compute_precision.activation_checkpointing=true`` checkpoints the student's blocks as the trainer
  does (after the FLOP count, so MFU keeps counting model FLOPs, not the recomputation). Records are keyed by the
  overrides too, so such a run sits beside the plain one.
- ``--chunked-losses true false``: run each config with the chunked Sinkhorn-Knopp targets and DINO / iBOT
  cross-entropies (``compute_precision.chunked_losses``) and with the plain ones; ``auto`` (default) = the trainer's
  choice (chunked on CUDA). The chunk size is ``compute_precision.loss_chunk_size`` (an override like any other).

Results are merged into ``OUT/train_step.json`` (one record per config × batch × mode × dtype × data × loss path,
written atomically after each run), and a Markdown table of every record in it is printed last. ``--results-md FILE``
appends that table as a dated section to FILE (only when given).

Reproduce (one GPU)::

    python benchmarks/train_step.py --config configs/train/IN21K/vitb14.yaml --config configs/train/IN21K/vitl14.yaml \\
        --batch-sizes 32 64 --breakdown --out results/perf
    python benchmarks/train_step.py --config configs/train/IN21K/vitb14.yaml --config configs/train/IN21K/vitl14.yaml \\
        --batch-sizes 32 64 --breakdown --compile --out results/perf --results-md benchmarks/RESULTS.md
    # plain vs chunked losses, side by side
    python benchmarks/train_step.py --config configs/train/IN21K/vitb14.yaml --config configs/train/IN21K/vitl14.yaml \\
        --batch-sizes 32 64 --breakdown --compile --chunked-losses false true --out results/perf
    # real data: an ImageFolder of JPEGs (e.g. made by benchmarks/data_pipeline.py --make-jpegs 2000)
    python benchmarks/train_step.py --config configs/train/IN21K/vitb14.yaml --batch-sizes 64 --compile \\
        --data loader --dataset ImageFolder:root=results/jpegs --num-workers 16 --out results/perf
"""

import argparse
import gc
import itertools
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Iterator

import torch
from common import (
    DeviceClock,
    append_results_section,
    environment,
    markdown_table,
    measure_matmul_peak,
    resolve_device,
    summarize_ms,
    write_json_atomic,
)
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from franca.data.samplers import SampleKey
from franca.train.build import build_collator, build_data, build_train_step, move_batch, prepare_batch
from franca.train.config import apply_scaling_rules, load_config
from franca.train.parallel import apply_activation_checkpointing, apply_compile
from franca.train.runtime import Runtime, resolve_autocast_dtype
from franca.train.ssl_meta_arch import SSLMetaArch
from franca.train.step import TRAIN_STEP_PHASES, TrainStep

FLOP_NOTE = (
    "FlopCounterMode counts matmul (mm/addmm/bmm), convolution and scaled-dot-product-attention FLOPs of forward and "
    "backward only; elementwise ops, norms, softmax, Sinkhorn-Knopp and the optimizer are not counted"
)


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kw) -> int:
    return sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


# FlopCounterMode has formulas for the CUDA attention kernels only; the CPU flash kernel takes the same [B,H,T,d].
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}
N_DISTINCT_MASK_SETS = 8
RESULT_KEY = ("config", "batch_size", "compile", "dtype", "data", "chunked_losses", "overrides")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "benchmarks/train_step.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", action="append", required=True, help="training config file; repeat the flag for several")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 64], help="images per step (per GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile every block of both backbones")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"), help="autocast (auto: bf16 on CUDA)")
    p.add_argument(
        "--chunked-losses",
        nargs="+",
        default=["auto"],
        choices=("auto", "true", "false"),
        help="compute_precision.chunked_losses for each run; several values run each (auto: chunked on CUDA)",
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before timing (compilation happens here)")
    p.add_argument("--data", default="synthetic", choices=("synthetic", "loader"))
    p.add_argument("--dataset", default=None, help="dataset string for --data loader, e.g. ImageFolder:root=DIR")
    p.add_argument("--num-workers", type=int, default=10, help="data-loader workers for --data loader")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--breakdown", action="store_true", help="also time the phases of the step")
    p.add_argument("--peak-size", type=int, default=8192, help="side of the square matmul measuring the peak")
    p.add_argument("--out", default="results/perf", help="folder of train_step.json")
    p.add_argument("--results-md", default=None, help="append the table as a dated section to this Markdown file")
    p.add_argument("opts", nargs="*", default=[], help="config overrides key=value (e.g. student.depth=2)")
    return p


def build_config(
    config_file: str, batch_size: int, args: argparse.Namespace, chunked_losses: str = "auto"
) -> DictConfig:
    """The trainer's config for one run: file ← overrides ← batch size, dtype, compile, loss path (and dataset); lr by
    scaling rule."""
    overrides = list(args.opts) + [
        f"train.batch_size_per_gpu={batch_size}",
        f"compute_precision.dtype={args.dtype}",
        f"compute_precision.compile={str(args.compile).lower()}",
        f"compute_precision.chunked_losses={chunked_losses}",
    ]
    if args.data == "loader":
        overrides += [f"train.dataset_path={args.dataset}", f"train.num_workers={args.num_workers}"]
    cfg = load_config(config_file, overrides)
    return apply_scaling_rules(cfg, world_size=1)


def synthetic_batches(cfg: DictConfig, device: torch.device, n_mask_sets: int = N_DISTINCT_MASK_SETS) -> list[dict]:
    """Collated batches with random crops and the collator's masks of iterations 0..n−1 (crops shared).

    The collator is given empty placeholder crops, so its masks, indices, weights and bounds are exactly those of
    the training collate; the crops are then random normal tensors of the collated shapes, made on ``device``.
    """
    batch_size, n_local = cfg.train.batch_size_per_gpu, cfg.crops.local_crops_number
    g, s = cfg.crops.global_crops_size, cfg.crops.local_crops_size
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    global_crops = torch.randn(2 * batch_size, 3, g, g, generator=generator, device=device)
    local_crops = torch.randn(n_local * batch_size, 3, s, s, generator=generator, device=device)
    collator = build_collator(cfg)
    placeholder = torch.empty(0)
    batches = []
    for iteration in range(n_mask_sets):
        samples = [
            ({"global_crops": [placeholder] * 2, "local_crops": [placeholder] * n_local}, 0, SampleKey(i, 0, iteration))
            for i in range(batch_size)
        ]
        batch = move_batch(collator(samples), device)
        batch["collated_global_crops"], batch["collated_local_crops"] = global_crops, local_crops
        batches.append(batch)
    return batches


def batch_stream(cfg: DictConfig, data: str, runtime: Runtime) -> Iterator[dict]:
    if data == "synthetic":
        return itertools.cycle(synthetic_batches(cfg, runtime.device))
    _, loader = build_data(cfg, 0, batched_photometric=runtime.batched_photometric)
    return (prepare_batch(batch, runtime) for batch in loader)


def make_train_step(cfg: DictConfig, runtime: Runtime) -> TrainStep:
    """The trainer's :class:`TrainStep` for ``cfg`` on an unparallelised model (compile and activation checkpointing
    are applied later, after the FLOP count)."""
    model = SSLMetaArch(cfg).to(runtime.device, dtype=runtime.param_dtype)
    model.train()
    return build_train_step(cfg, model, runtime)


def timed_step(step: TrainStep, batch: dict, iteration: int, clock) -> dict[str, torch.Tensor]:
    """One :class:`TrainStep` call with ``clock.mark`` at its start and after each of :data:`TRAIN_STEP_PHASES` (the
    library's own marks); ``clock`` is a :class:`DeviceClock` (time) or a :class:`FlopMarks` (FLOPs)."""
    clock.mark("start")
    return step(batch, iteration, on_phase=clock.mark)


class FlopMarks:
    """Running FLOP totals of a ``FlopCounterMode`` at named marks (the FLOP analogue of ``DeviceClock``)."""

    def __init__(self, counter: FlopCounterMode):
        self.counter = counter
        self.marks: list[tuple[str, int]] = []

    def mark(self, name: str) -> None:
        self.marks.append((name, self.counter.get_total_flops()))

    def intervals(self) -> list[tuple[str, int]]:
        return [(name, end - start) for (_, start), (name, end) in zip(self.marks[:-1], self.marks[1:], strict=True)]


def count_step_flops(step: TrainStep, batch: dict, iteration: int) -> int:
    """FLOPs of one real eager step (see :data:`FLOP_NOTE`)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        step(batch, iteration)
    return counter.get_total_flops()


def count_phase_flops(step: TrainStep, batch: dict, iteration: int) -> dict[str, int]:
    """FLOPs of each of :data:`TRAIN_STEP_PHASES` in one eager instrumented step."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        marks = FlopMarks(counter)
        timed_step(step, batch, iteration, marks)
    return dict(marks.intervals())


def run_steps(step: TrainStep, batches: Iterator[dict], start: int, count: int) -> tuple[list[float], list[float]]:
    """Time ``count`` full steps from iteration ``start``: per-step ms (device clock) and data-wait ms (host)."""
    clock, waits = DeviceClock(step.runtime.device), []
    clock.mark("start")
    for iteration in range(start, start + count):
        t0 = time.perf_counter()
        batch = next(batches)
        waits.append((time.perf_counter() - t0) * 1000.0)
        step(batch, iteration)
        clock.mark("step")
    return [ms for _, ms in clock.intervals()], waits


def run_breakdown(step: TrainStep, batches: Iterator[dict], start: int, count: int) -> dict[str, float]:
    """Mean ms per phase of :data:`TRAIN_STEP_PHASES` over ``count`` instrumented steps."""
    totals = dict.fromkeys(TRAIN_STEP_PHASES, 0.0)
    for iteration in range(start, start + count):
        clock = DeviceClock(step.runtime.device)
        timed_step(step, next(batches), iteration, clock)
        for name, ms in clock.intervals():
            totals[name] += ms
    return {name: total / count for name, total in totals.items()}


def model_label(cfg: DictConfig) -> str:
    heads = f"{len(cfg.dino.nesting_list) or 5}-level MRL" if cfg.dino.MRL else "DINO"
    return f"{cfg.student.arch}/{cfg.student.patch_size} ({heads}, {cfg.dino.head_n_prototypes} prototypes)"


def benchmark(
    config_file: str, batch_size: int, chunked_losses: str, args: argparse.Namespace, device: torch.device, peak: dict
) -> dict:
    """One record: throughput, FLOPs, MFU, memory (and breakdown) of one config at one batch size and loss path."""
    cfg = build_config(config_file, batch_size, args, chunked_losses)
    record = {
        "config": config_file,
        "model": model_label(cfg),
        "batch_size": batch_size,
        "compile": args.compile,
        "dtype": args.dtype,
        "data": args.data,
        "chunked_losses": chunked_losses,
        "overrides": list(args.opts),
    }
    torch.manual_seed(cfg.train.seed)
    step = make_train_step(cfg, Runtime.resolve(cfg, device))
    record["loss_chunk_size"] = step.runtime.loss_chunk_size
    record["autocast_dtype"] = str(step.runtime.autocast_dtype or torch.float32).removeprefix("torch.")
    batches = batch_stream(cfg, args.data, step.runtime)
    first = next(batches)
    record["n_masked_patches_flop_step"] = int(first["mask_indices_list"].numel())
    flops = count_step_flops(step, first, 0)
    phase_flops = count_phase_flops(step, first, 1) if args.breakdown else None
    # After the FLOP count: MFU counts the model's FLOPs, not the recomputation of activation checkpointing.
    if cfg.compute_precision.activation_checkpointing:
        apply_activation_checkpointing(step.model.student["backbone"].blocks)
    if step.runtime.compile:
        for models in (step.model.student, step.model.teacher):
            apply_compile(models["backbone"].blocks)
    label = f"{record['model']} batch {batch_size} chunked_losses={chunked_losses}"
    print(f"{label}: {args.warmup} warm-up steps", flush=True)
    run_steps(step, batches, 2, args.warmup)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = 2 + args.warmup
    step_ms, wait_ms = run_steps(step, batches, start, args.steps)
    stats = summarize_ms(step_ms)
    step_s = stats["mean"] / 1000.0
    record.update(
        {
            "steps": args.steps,
            "warmup": args.warmup,
            "step_ms": stats,
            "data_wait_ms_mean": sum(wait_ms) / len(wait_ms),
            "img_per_s": batch_size / step_s,
            "flops_per_step": flops,
            "achieved_flops_per_s": flops / step_s,
            "mfu": flops / step_s / peak["flops_per_s"],
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None,
        }
    )
    if args.breakdown:
        phases = run_breakdown(step, batches, start + args.steps, args.steps)
        record["breakdown_ms"] = phases
        record["breakdown_sum_ms"] = sum(phases.values())
        record["breakdown_flops"] = phase_flops
    return record


def release_memory() -> None:
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def merge_records(existing: list[dict], new: dict) -> list[dict]:
    """Replace the record with the same :data:`RESULT_KEY` (a re-run) or append."""
    key = tuple(new.get(k) for k in RESULT_KEY)
    return [r for r in existing if tuple(r.get(k) for k in RESULT_KEY) != key] + [new]


def results_table(records: list[dict]) -> str:
    headers = ["model", "batch", "mode", "data", "img/s", "step ms", "TFLOP/step", "TFLOP/s", "MFU", "peak GiB"]
    headers += [f"{p} ms" for p in TRAIN_STEP_PHASES]
    rows = []
    for r in records:
        mode = ("compiled" if r["compile"] else "eager") + f" {r.get('autocast_dtype', r['dtype'])}"
        mode += " chunked" if r.get("loss_chunk_size") else ""
        mode += "".join(f" {o}" for o in r.get("overrides", []))
        if "error" in r:
            rows.append([r.get("model", r["config"]), r["batch_size"], mode, r["data"], r["error"]] + [None] * 11)
            continue
        phases = r.get("breakdown_ms", {})
        rows.append(
            [
                r["model"],
                r["batch_size"],
                mode,
                r["data"],
                r["img_per_s"],
                r["step_ms"]["mean"],
                r["flops_per_step"] / 1e12,
                r["achieved_flops_per_s"] / 1e12,
                r["mfu"],
                r["peak_memory_gib"],
            ]
            + [phases.get(p) for p in TRAIN_STEP_PHASES]
        )
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    if args.data == "loader" and not args.dataset:
        raise SystemExit("--data loader needs --dataset, e.g. --dataset ImageFolder:root=/path/to/jpegs")
    if min(args.steps, args.warmup + 1, *args.batch_sizes) < 1:
        raise SystemExit("--steps and --batch-sizes must be >= 1 and --warmup >= 0")
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    env = environment(device)
    peak_dtype = resolve_autocast_dtype(args.dtype, device) or torch.float32
    print(f"measuring the {args.peak_size}³ {peak_dtype} matmul peak on {env['device']}", flush=True)
    peak = measure_matmul_peak(device, peak_dtype, args.peak_size)
    print(f"peak {peak['flops_per_s'] / 1e12:.3g} TFLOP/s", flush=True)

    out_path = Path(args.out) / "train_step.json"
    payload = {"runs": []}
    if out_path.exists():
        payload = json.loads(out_path.read_text())
    command = "python " + shlex.join(["benchmarks/train_step.py", *(sys.argv[1:] if argv is None else argv)])
    common_fields = {"environment": env, "command": command, "matmul_peak": peak, "flop_counter": FLOP_NOTE}
    for config_file, batch_size, chunked in itertools.product(args.config, args.batch_sizes, args.chunked_losses):
        try:
            record = benchmark(config_file, batch_size, chunked, args, device, peak)
        except torch.OutOfMemoryError as error:
            first_line = str(error).splitlines()[0]
            print(f"{config_file} batch {batch_size}: out of memory ({first_line})", flush=True)
            key = (config_file, batch_size, args.compile, args.dtype, args.data, chunked, list(args.opts))
            record = dict(zip(RESULT_KEY, key, strict=True))
            cfg = build_config(config_file, batch_size, args, chunked)
            record["loss_chunk_size"] = Runtime.resolve(cfg, device).loss_chunk_size
            record["error"] = "out of memory"
        record.update(common_fields)
        payload["runs"] = merge_records(payload["runs"], record)
        write_json_atomic(out_path, payload)
        if "error" not in record:
            print(
                f"{record['model']} batch {batch_size} chunked_losses={chunked}: {record['img_per_s']:.1f} img/s, "
                f"{record['step_ms']['mean']:.1f} ms/step, MFU {record['mfu']:.3f}",
                flush=True,
            )
        release_memory()
    table = results_table(payload["runs"])
    print(f"\nresults in {out_path}\n\n{table}", flush=True)
    if args.results_md:
        append_results_section(args.results_md, "Training step (benchmarks/train_step.py)", env, command, table)
        print(f"appended to {args.results_md}", flush=True)
    return payload


if __name__ == "__main__":
    main()
