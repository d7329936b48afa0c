"""Golden numerics: a fresh tiny training run reproduces the stored per-iteration losses.

``tests/data/golden/quickstart_losses.json`` holds the losses (and lr, wd, momentum, teacher temperature) of the first
50 iterations of a tiny quickstart-like run with a fixed seed, and the config overrides that define it (relative to
the package defaults, so tuning ``configs/train/quickstart.yaml`` does not affect it). Any change of the training
numerics (data order, augmentation, masking, init, losses, optimizer, schedules) moves these numbers.

The run is replayed in a child process in float64 (``compute_precision.dtype=fp64``), with one thread, AVX2 kernels
pinned and oneDNN convolutions off (``scripts/make_golden.py`` says why). Tolerance: relative 1e-5, set from
``python scripts/make_golden.py --measure-variation`` (benchmarks/RESULTS.md, "Golden numerics"): two threads or
MKL's own dispatch move the losses by < 1e-13, and the largest change seen, scalar ATen kernels instead of the pinned
AVX2 ones (which also changes the fp32 image augmentation), by 9e-7. A deliberate 1e-4 change of any loss term is
10x the tolerance, and ``test_a_small_change_of_any_loss_term_is_caught`` checks that it is caught.
"""

import importlib.util
import json
import platform
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN_FILE = Path(__file__).parent / "data" / "golden" / "quickstart_losses.json"
RELATIVE_TOLERANCE = 1e-5
LOSS_TERMS = ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss")


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
    for r in records:
        assert r["total_loss"] == pytest.approx(sum(r[k] for k in LOSS_TERMS), rel=1e-12)
    assert not any(o.startswith("--config") for o in golden["overrides"]), "the golden run must not read a config file"
    assert "compute_precision.dtype=fp64" in golden["overrides"], "the golden run is float64 (see the module docstring)"
    assert records[0]["lr"] == 0.0 and records[0]["teacher_temp"] == pytest.approx(0.04)


@pytest.mark.parametrize("term", LOSS_TERMS)
def test_the_comparison_flags_a_relative_change_of_1e_4(term):
    golden = json.loads(GOLDEN_FILE.read_text())["records"]
    changed = [dict(r) for r in golden]
    changed[17][term] *= 1 + 1e-4
    keys = ("total_loss", *LOSS_TERMS)
    assert _mismatches(golden, golden, keys) == []
    assert [line.split(":")[0] for line in _mismatches(golden, changed, keys)] == [f"iteration 17 {term}"]


def _golden_or_skip() -> dict:
    golden = json.loads(GOLDEN_FILE.read_text())
    if platform.machine() != golden["versions"]["machine"]:
        pytest.skip(f"golden losses were made on {golden['versions']['machine']}, this is {platform.machine()}")
    if "ATEN_CPU_CAPABILITY" in golden["environment"] and torch.backends.cpu.get_cpu_capability() not in (
        "AVX2",
        "AVX512",
    ):
        pytest.skip("the golden run pins PyTorch's AVX2 kernels, which this CPU does not have")
    return golden


@pytest.mark.slow
@pytest.mark.parametrize("term", LOSS_TERMS)
def test_a_small_change_of_any_loss_term_is_caught(term):
    """A replay whose ``term`` is multiplied by 1 + 1e-4 in every step (a real change of the numerics, gradients
    included) fails the golden comparison at iteration 0, on that term; the unchanged terms still match."""
    golden = _golden_or_skip()
    make_golden = _load_make_golden()
    changed = make_golden.replay([*golden["overrides"], "train.stop_at_iteration=1"], scale_loss=(term, 1 + 1e-4))
    assert [r["iteration"] for r in changed] == [0]
    flagged = _mismatches(golden["records"][:1], changed, LOSS_TERMS)
    assert [line.split(":")[0] for line in flagged] == [f"iteration  0 {term}"]


@pytest.mark.slow
def test_fresh_run_reproduces_golden_losses():
    golden = _golden_or_skip()
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
