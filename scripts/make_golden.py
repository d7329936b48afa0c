"""Regenerate ``tests/data/golden/quickstart_losses.json``: the per-iteration losses of a pinned tiny training run.

``python scripts/make_golden.py --reason "why the numerics changed on purpose"``

The run is the quickstart model (ViT 128-d, depth 4, patch 4 on 28 px Fashion-MNIST crops, nested Matryoshka heads,
CyclicMask, Sinkhorn-Knopp, KoLeo) at batch 8 for 50 iterations, fp32 on the CPU, on the shipped Fashion-MNIST subset.
Its configuration is ``GOLDEN_OVERRIDES`` applied to the package defaults (``franca/configs/ssl_default_config.yaml``),
not to ``configs/train/quickstart.yaml``, so tuning the quickstart recipe does not move the golden numbers.

The run happens in a child process whose floating-point environment is pinned (``pinned_environment``): one thread,
and on x86-64 PyTorch's AVX2 kernels, MKL's AVX2 code path and oneDNN's AVX2 ISA. The same run then gives the same bits
on any x86-64 CPU with AVX2; unpinned, the AVX-512 kernels already change the losses at iteration 1, and 50 training
steps amplify that one-ulp change to 2e-3 (KoLeo: 5e-2), far more than a tolerance can absorb without hiding real
changes. The file stores the overrides, the environment, the versions and the reason; ``tests/test_golden.py``
replays it. Regenerate only when a change of the training numerics is intended (a fixed bug, a new default), and put
the printed line in the commit message.
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
    "compute_precision.dtype=fp32",
]


def environment_pins() -> dict[str, str]:
    """The variables that fix the floating-point environment on this machine (ISA pins on x86-64 only)."""
    is_x86 = platform.machine().lower() in ("x86_64", "amd64")
    return {**THREAD_PINS, **(X86_ISA_PINS if is_x86 else {})}


def pinned_environment() -> dict[str, str]:
    """This process's environment with the pins applied and the repository importable."""
    python_path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, **environment_pins(), "PYTHONPATH": python_path}


def replay(overrides: list[str], timeout_s: float = 600.0) -> list[dict]:
    """Train from scratch with ``overrides`` on the defaults in a pinned child process; per-iteration records."""
    with tempfile.TemporaryDirectory(prefix="franca_golden_") as tmp:
        records_file = Path(tmp) / "records.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--records-out", str(records_file), *overrides]
        result = subprocess.run(
            command, env=pinned_environment(), capture_output=True, text=True, timeout=timeout_s, cwd=REPO
        )
        if result.returncode != 0:
            raise RuntimeError(f"the golden training run failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
        return json.loads(records_file.read_text())


def _train_and_record(overrides: list[str], records_out: Path) -> None:
    """Child side of :func:`replay`: refuses to run unpinned, trains, writes the loss and schedule values."""
    unpinned = {k: v for k, v in environment_pins().items() if os.environ.get(k) != v}
    if unpinned:
        raise SystemExit(
            f"--records-out runs only in the pinned environment ({unpinned} differ); call replay() or use --reason"
        )
    from franca.train import train as trainer
    from franca.utils.logging import read_metrics

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
    parser.add_argument("--records-out", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.records_out:
        _train_and_record(args.overrides, Path(args.records_out))
        return
    if not (args.reason or "").strip():
        raise SystemExit("give --reason: why the golden losses change on purpose, e.g. --reason 'fix the KoLeo eps'")
    regenerate(args.reason.strip(), Path(args.output))


if __name__ == "__main__":
    main()
