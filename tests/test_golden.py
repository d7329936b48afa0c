"""Golden numerics: a fresh tiny training run reproduces the stored per-iteration losses.

``tests/data/golden/quickstart_losses.json`` holds the losses (and lr, wd, momentum, teacher temperature) of the first
50 iterations of a tiny quickstart-like run with a fixed seed, and the config overrides that define it (relative to
the package defaults, so tuning ``configs/train/quickstart.yaml`` does not affect it). Any change of the training
numerics (data order, augmentation, masking, init, losses, optimizer, schedules) moves these numbers.

Tolerance: relative 1e-6. The run is replayed in a child process with a pinned floating-point environment (one thread;
on x86-64 PyTorch's AVX2 kernels, MKL's AVX2 path and oneDNN's AVX2 ISA; see ``scripts/make_golden.py``), in which
it is bit-for-bit reproducible on any x86-64 CPU with AVX2, so the expected difference is exactly 0; 1e-6 only allows
for a last-bits change of a library kernel. A looser tolerance would not absorb unpinned differences anyway: a one-ulp
change at iteration 1 (AVX-512 instead of AVX2 kernels) grows to 2e-3 by iteration 50 (5e-2 for KoLeo, whose log of
the nearest-neighbour distance magnifies tiny differences between nearly collapsed early features).
"""

import importlib.util
import json
import platform
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN_FILE = Path(__file__).parent / "data" / "golden" / "quickstart_losses.json"
RELATIVE_TOLERANCE = 1e-6


def _load_make_golden():
    spec = importlib.util.spec_from_file_location("make_golden", REPO / "scripts" / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mismatches(golden: list[dict], fresh: list[dict], keys: tuple[str, ...]) -> list[str]:
    lines = []
    if [r["iteration"] for r in golden] != [r["iteration"] for r in fresh]:
        return [f"logged iterations differ: golden {len(golden)} records, fresh run {len(fresh)}"]
    for old, new in zip(golden, fresh):
        for key in keys:
            if abs(new[key] - old[key]) > RELATIVE_TOLERANCE * max(abs(old[key]), 1e-12):
                lines.append(f"iteration {old['iteration']:>2} {key}: golden {old[key]!r}, now {new[key]!r}")
    return lines


def test_golden_file_is_consistent():
    golden = json.loads(GOLDEN_FILE.read_text())
    records = golden["records"]
    assert [r["iteration"] for r in records] == list(range(50))
    terms = ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss")
    for r in records:
        assert r["total_loss"] == pytest.approx(sum(r[k] for k in terms), rel=1e-12)
    assert not any(o.startswith("--config") for o in golden["overrides"]), "the golden run must not read a config file"
    assert records[0]["lr"] == 0.0 and records[0]["teacher_temp"] == pytest.approx(0.04)


def test_fresh_run_reproduces_golden_losses():
    golden = json.loads(GOLDEN_FILE.read_text())
    if platform.machine() != golden["versions"]["machine"]:
        pytest.skip(f"golden losses were made on {golden['versions']['machine']}, this is {platform.machine()}")
    if "ATEN_CPU_CAPABILITY" in golden["environment"] and torch.backends.cpu.get_cpu_capability() not in (
        "AVX2",
        "AVX512",
    ):
        pytest.skip("the golden run pins PyTorch's AVX2 kernels, which this CPU does not have")
    make_golden = _load_make_golden()
    assert golden["environment"] == make_golden.environment_pins(), "the golden file was made in another environment"

    fresh = make_golden.replay(golden["overrides"])

    problems = _mismatches(golden["records"], fresh, make_golden.LOSS_KEYS + make_golden.SCHEDULE_KEYS)
    torch_note = (
        f" The golden file was made with torch {golden['versions']['torch']}, this is torch {torch.__version__}."
        if golden["versions"]["torch"] != torch.__version__
        else ""
    )
    assert not problems, (
        f"{len(problems)} values differ from {GOLDEN_FILE.relative_to(REPO)} by more than rel {RELATIVE_TOLERANCE}:\n"
        + "\n".join(problems[:10])
        + f"\nThe training numerics changed.{torch_note} If the change is a bug, fix it. If it is intended, regenerate "
        'the file with `python scripts/make_golden.py --reason "<why>"` and put the printed line in the commit '
        f"message (golden reason so far: {golden['reason']!r})."
    )
