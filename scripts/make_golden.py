"""Regenerate ``tests/data/golden/quickstart_losses.json``: the per-iteration losses of a pinned tiny training run.

``python scripts/make_golden.py --reason "why the numerics changed on purpose"``

The run is the quickstart model (ViT 128-d, depth 4, patch 4 on 28 px Fashion-MNIST crops, nested Matryoshka heads,
CyclicMask, Sinkhorn-Knopp, KoLeo) at batch 8 for 50 iterations on the CPU, on the shipped Fashion-MNIST subset. Its
configuration is ``GOLDEN_OVERRIDES`` applied to the package defaults (``franca/configs/ssl_default_config.yaml``),
not to ``configs/train/quickstart.yaml``, so tuning the quickstart recipe does not move the golden numbers.

Why float64 (``compute_precision.dtype=fp64``): the golden run must give the same numbers on every x86-64 CPU. In
fp32 it cannot: math libraries pick kernels and blockings by CPU (oneDNN and MKL by cache sizes and vendor), which
changes summation orders, and KoLeo's log of nearest-neighbour distances between nearly collapsed early features
turns those last-bit differences into 2e-3 at iteration 0 (an Intel Xeon gave koleo 2.1031 where an AMD EPYC gave
2.1071); 50 steps amplify them further. In float64 the same kernel differences start ~1e-9 times smaller, and stay
far below the tolerance after 50 steps, while a real change of the numerics (1e-4 in any loss term) is still caught.
The images are decoded and augmented as in training (uint8, then fp32 normalisation, both exact operations); the
batch is cast to float64 on the way into the step.

The child process also pins what it can (one thread; on x86-64 PyTorch's AVX2 kernels, MKL's AVX2 path and oneDNN's
AVX2 ISA), which removes most kernel differences to begin with. ``--measure-variation`` replays the run with those
pins changed (scalar instead of AVX2 kernels, two threads, MKL's and oneDNN's own dispatch) and with a 1e-12 relative
kick to one loss term, and reports the largest relative difference it sees; ``tests/test_golden.py`` sets its
tolerance from that measurement (recorded in benchmarks/RESULTS.md, "Golden numerics"). The file stores the
overrides, the environment, the versions and the reason. Regenerate only when a change of the training numerics is
intended (a fixed bug, a new default), and put the printed line in the commit message.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOLDEN_FILE = REPO / "tests" / "data" / "golden" / "quickstart_losses.json"
LOSS_KEYS = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss")
SCHEDULE_KEYS = ("lr", "wd", "mom", "teacher_temp")
THREAD_PINS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
X86_ISA_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
# Set to 1, the child keeps oneDNN (mkldnn) convolutions on; by default it turns them off (see the module docstring).
ONEDNN_SWITCH = "FRANCA_GOLDEN_ONEDNN"
# What --measure-variation changes, one replay each: other kernels and summation orders for the same numerics.
VARIATIONS = {
    "scalar ATen kernels": {"ATEN_CPU_CAPABILITY": "default"},
    "two threads": {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"},
    "MKL and oneDNN dispatch unpinned": {"MKL_CBWR": None, "ONEDNN_MAX_CPU_ISA": None},
    "oneDNN convolutions (SSE4.1)": {ONEDNN_SWITCH: "1", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "oneDNN convolutions (AVX2)": {ONEDNN_SWITCH: "1"},
}
KICK = ("koleo_loss", 1e-12)
GOLDEN_OVERRIDES = [
    "dino.head_n_prototypes=512",
    "dino.head_bottleneck_dim=64",
    "dino.head_hidden_dim=256",
    "dino.MRL=true",
    "dino.mrl_l2_norm=true",
    "ibot.separate_head=true",
    "ibot.head_n_prototypes=512",
    "ibot.head_bottleneck_dim=64",
    "ibot.head_hidden_dim=256",
    "train.batch_size_per_gpu=8",
    "train.dataset_path=FashionMNIST:root=bundled:split=train",
    "train.OFFICIAL_EPOCH_LENGTH=10",
    "train.num_workers=0",
    "train.centering=sinkhorn_knopp",
    "train.use_block_masking=true",
    "train.use_inverse_block=true",
    "train.roll=true",
    "train.log_period=1",
    "train.saveckp_freq=5",
    "train.seed=0",
    "student.arch=vit_tiny",
    "student.embed_dim=128",
    "student.depth=4",
    "student.num_heads=4",
    "student.patch_size=4",
    "student.drop_path_rate=0.1",
    "student.ffn_layer=swiglufused",
    "student.block_chunks=4",
    "teacher.momentum_teacher=0.99",
    "teacher.warmup_teacher_temp_epochs=1",
    "optim.epochs=5",
    "optim.warmup_epochs=1",
    "optim.base_lr=0.002",
    "optim.weight_decay_end=0.2",
    "optim.layerwise_decay=1.0",
    "optim.freeze_last_layer_epochs=1",
    "crops.global_crops_size=28",
    "crops.local_crops_size=12",
    "crops.local_crops_number=4",
    "evaluation.eval_period_iterations=0",
    "compute_precision.dtype=fp64",
]


def environment_pins() -> dict[str, str]:
    """The variables that fix the floating-point environment on this machine (ISA pins on x86-64 only)."""
    is_x86 = platform.machine().lower() in ("x86_64", "amd64")
    return {**THREAD_PINS, **(X86_ISA_PINS if is_x86 else {})}


def pinned_environment(changes: dict[str, str | None] | None = None) -> dict[str, str]:
    """This process's environment with the pins applied (then ``changes``: None removes a variable) and the repository
    importable."""
    python_path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, **environment_pins(), "PYTHONPATH": python_path}
    for key, value in (changes or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def replay(
    overrides: list[str],
    timeout_s: float = 600.0,
    environment_changes: dict[str, str | None] | None = None,
    scale_loss: tuple[str, float] | None = None,
) -> list[dict]:
    """Train from scratch with ``overrides`` on the defaults in a pinned child process; per-iteration records.

    ``environment_changes`` alters the pins (``--measure-variation``); ``scale_loss=(term, factor)`` multiplies one
    loss term by ``factor`` in every step, a deliberate change of the numerics (tests/test_golden.py checks that
    1 + 1e-4 is caught)."""
    with tempfile.TemporaryDirectory(prefix="franca_golden_") as tmp:
        records_file = Path(tmp) / "records.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--records-out", str(records_file)]
        if scale_loss is not None:
            command += ["--scale-loss", f"{scale_loss[0]}={scale_loss[1]!r}"]
        result = subprocess.run(
            [*command, *overrides],
            env=pinned_environment(environment_changes),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=REPO,
        )
        if result.returncode != 0:
            raise RuntimeError(f"the golden training run failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
        return json.loads(records_file.read_text())


def _scale_one_loss_term(term: str, factor: float) -> None:
    """Multiply loss ``term`` by ``factor`` in every step of this process (the child of ``replay(scale_loss=...)``)."""
    from franca.train.ssl_meta_arch import SSLMetaArch

    assemble = SSLMetaArch.assemble_losses

    def scaled(self, *args, **kwargs):
        losses = assemble(self, *args, **kwargs)
        if term not in losses:
            raise SystemExit(f"--scale-loss {term}: no such loss term; the terms are {sorted(losses)}")
        return {**losses, term: losses[term] * factor}

    SSLMetaArch.assemble_losses = scaled


def _train_and_record(overrides: list[str], records_out: Path, scale_loss: str | None) -> None:
    """Child side of :func:`replay`: refuses to run with more than one thread, trains, writes the loss and schedule
    values."""
    unpinned = {k: os.environ.get(k) for k in THREAD_PINS if os.environ.get(k) is None}
    if unpinned:
        raise SystemExit(f"--records-out runs only with {sorted(THREAD_PINS)} set; call replay() or use --reason")
    import torch

    from franca.train import train as trainer
    from franca.utils.logging import read_metrics

    torch.backends.mkldnn.enabled = os.environ.get(ONEDNN_SWITCH) == "1"
    if scale_loss:
        term, _, factor = scale_loss.partition("=")
        _scale_one_loss_term(term, float(factor))
    with tempfile.TemporaryDirectory(prefix="franca_golden_run_") as run_dir:
        trainer.main(["--output-dir", run_dir, "--no-resume", *overrides])
        records = [
            {"iteration": r["iteration"], **{k: r[k] for k in LOSS_KEYS + SCHEDULE_KEYS}}
            for r in read_metrics(Path(run_dir) / "training_metrics.json")
        ]
    records_out.write_text(json.dumps(records))


def largest_relative_change(old: list[dict], new: list[dict]) -> float:
    """max |new − old| / max(|old|, 1e-12) over the loss terms of the iterations both lists hold."""
    changes = [
        abs(b[k] - a[k]) / max(abs(a[k]), 1e-12)
        for a, b in zip(old, new)
        if a["iteration"] == b["iteration"]
        for k in LOSS_KEYS
    ]
    return max(changes, default=float("nan"))


def measure_variation() -> dict[str, float]:
    """Largest relative loss difference between the pinned replay and each of :data:`VARIATIONS`, and :data:`KICK`."""
    reference = replay(GOLDEN_OVERRIDES)
    found = {}
    for name, changes in VARIATIONS.items():
        found[name] = largest_relative_change(reference, replay(GOLDEN_OVERRIDES, environment_changes=changes))
        print(f"{name:<36} largest relative difference {found[name]:.3g}", flush=True)
    term, kick = KICK
    name = f"{term} x (1 + {kick:g})"
    found[name] = largest_relative_change(reference, replay(GOLDEN_OVERRIDES, scale_loss=(term, 1 + kick)))
    print(f"{name:<36} largest relative difference {found[name]:.3g}", flush=True)
    return found


def regenerate(reason: str, output: Path) -> Path:
    import torch

    from franca.utils.atomic import atomic_write

    records = replay(GOLDEN_OVERRIDES)
    golden = {
        "description": "per-iteration losses of the pinned tiny quickstart run; replayed by tests/test_golden.py",
        "reason": reason,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "overrides": GOLDEN_OVERRIDES,
        "environment": environment_pins(),
        "versions": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()},
        "records": records,
    }
    previous = json.loads(output.read_text())["records"] if output.is_file() else None
    atomic_write(output, json.dumps(golden, indent=1) + "\n")
    print(f"wrote {len(records)} iterations to {output}")
    if previous is not None:
        change = largest_relative_change(previous, records)
        print(f"largest relative change of a loss against the previous file: {change:.3g}")
    print(f"commit message line:\n  Regenerate golden losses ({output.name}, torch {torch.__version__}): {reason}")
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser("make_golden", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--reason", help="why the training numerics changed on purpose (goes in the commit message)")
    parser.add_argument("--output", default=str(GOLDEN_FILE), help="where to write the golden file")
    parser.add_argument(
        "--measure-variation", action="store_true", help="replay under other kernels and threads; print the differences"
    )
    parser.add_argument("--records-out", help=argparse.SUPPRESS)
    parser.add_argument("--scale-loss", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.records_out:
        _train_and_record(args.overrides, Path(args.records_out), args.scale_loss)
        return
    if args.measure_variation:
        measure_variation()
        return
    if not (args.reason or "").strip():
        raise SystemExit("give --reason: why the golden losses change on purpose, e.g. --reason 'fix the KoLeo eps'")
    regenerate(args.reason.strip(), Path(args.output))


if __name__ == "__main__":
    main()
