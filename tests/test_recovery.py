"""Recovery without a human: atomic writes and their leftovers, fallback to an older checkpoint, a torn metrics line,
MODEL.WEIGHTS, and a run killed again and again while it writes checkpoints (training.md, "Recovery")."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import TINY_MODEL

from franca.checkpoint import (
    CheckpointMismatchError,
    TrainingCheckpointer,
    UnreadableCheckpointError,
    list_checkpoints,
    save_teacher_release,
    teacher_export_path,
)
from franca.checkpoint import distributed as checkpoint_distributed
from franca.checkpoint.consolidate import main as consolidate_main
from franca.checkpoint.distributed import DCP_STAGING_PATTERN, TRAIN_STATE_FILE, model_and_optimizer_state
from franca.checkpoint.records import record_path
from franca.train import train as trainer
from franca.train.config import load_config
from franca.train.ssl_meta_arch import SSLMetaArch
from franca.utils.atomic import atomic_write, sweep_stale_temporaries, temporary_path
from franca.utils.config_schema import save_config
from franca.utils.logging import MetricsWriter
from franca.utils.processes import process_token
from franca.utils.weight_files import atomic_torch_save

REPO = Path(__file__).resolve().parents[1]


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


# ---------------------------------------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_whole_files_with_umask_permissions(tmp_path):
    path = atomic_write(tmp_path / "a" / "f.txt", "old")
    atomic_write(path, b"new")
    atomic_write(path, lambda stream: stream.write(b"newest"))
    assert path.read_bytes() == b"newest"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert temporaries(tmp_path) == []


def test_a_failed_write_removes_its_temporary_and_keeps_the_old_file(tmp_path):
    path = atomic_write(tmp_path / "f.bin", b"old")

    def fail_midway(stream):
        stream.write(b"x" * 1000)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(path, fail_midway)
    assert path.read_bytes() == b"old" and temporaries(tmp_path) == []


def test_sweep_removes_temporaries_of_dead_writers_only(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".model_0000003.pth.tmp.{dead.pid}"
    live = tmp_path / f".model_0000006.pth.tmp.{os.getppid()}"  # a running process that may still be writing
    # this process has written nothing yet: a file with its pid was left by an earlier process with the same pid
    reused_pid = tmp_path / f".model_0000009.pth.tmp.{os.getpid()}"
    staging = tmp_path / ".dcp_0000009.tmp"
    for path in (stale, live, reused_pid):
        path.write_bytes(b"partial")
    staging.mkdir()
    (staging / "__0_0.distcp").write_bytes(b"partial")
    keep = tmp_path / "model_0000003.pth"
    keep.write_bytes(b"complete")
    removed = sweep_stale_temporaries(tmp_path, extra_patterns=(DCP_STAGING_PATTERN,))
    assert sorted(removed) == sorted([stale, reused_pid, staging])
    assert live.exists() and keep.exists()


def test_a_temporary_tagged_with_the_pid_of_a_live_unrelated_process_is_swept(tmp_path):
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        token = process_token(unrelated.pid)
        other_token = f".{(int(token, 16) ^ 1):08x}" if token else ""
        # a temporary of an older franca (pid only), written before that process started: not its writer
        legacy = tmp_path / f".model_0000003.pth.tmp.{unrelated.pid}"
        legacy.write_bytes(b"partial")
        os.utime(legacy, (time.time() - 3600, time.time() - 3600))
        # a temporary whose token names another process that had the same pid
        reused = tmp_path / f".model_0000006.pth.tmp.{unrelated.pid}{other_token}"
        reused.write_bytes(b"partial")
        # the live writer itself (its own token), and a pid-only temporary it may still be writing
        writing = tmp_path / (f".model_0000009.pth.tmp.{unrelated.pid}" + (f".{token}" if token else ""))
        recent = tmp_path / f".model_0000012.pth.tmp.{unrelated.pid}"
        writing.write_bytes(b"partial")
        recent.write_bytes(b"partial")
        removed = sweep_stale_temporaries(tmp_path)
    finally:
        unrelated.kill()
        unrelated.wait()
    assert sorted(removed) == sorted([legacy, reused] if token else [legacy])
    assert writing.exists() and recent.exists()


def test_temporaries_carry_this_process_token():
    token = process_token(os.getpid())
    if token is None:
        pytest.skip("no /proc here: temporaries carry the pid alone")
    assert temporary_path("/x/model.pth").name == f".model.pth.tmp.{os.getpid()}.{token}"


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (root only), unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_says_how_much_was_needed_and_leaves_the_disk_as_it_was(small_disk):
    written_and_free = r".* were written before the disk filled; .* are free in .*; it needs about 1\.0 MiB"
    with pytest.raises(OSError, match=r"no space left writing .*f\.bin: " + written_and_free) as info:
        atomic_write(small_disk / "f.bin", os.urandom(1 << 20))
    assert info.value.errno == errno.ENOSPC
    assert list(small_disk.iterdir()) == []
    atomic_write(small_disk / "config.yaml", "a: 1\n")  # the rerun's first write succeeds


@pytest.mark.parametrize("layout", ["file", "dcp"])
@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_on_disk_names_the_space_needed_and_free(small_disk, layout, monkeypatch):
    """torch.save and DCP report a full disk as ``RuntimeError: ... unexpected pos``; the message must still come."""
    if layout == "dcp":  # the several-process layout, in this one process (collectives are no-ops here)
        monkeypatch.setattr(checkpoint_distributed, "get_world_size", lambda: 2)
    cfg = load_config(None, TINY_MODEL)
    model = SSLMetaArch(cfg)
    optimizer = torch.optim.AdamW(model.student.parameters())
    checkpointer = TrainingCheckpointer(small_disk, keep=1)
    with pytest.raises(OSError) as info:
        checkpointer.save(3, model, optimizer)
    moments = [t for state in optimizer.state.values() for t in state.values()]  # zero moments and steps, saved too
    needed = sum(t.numel() * t.element_size() for t in [*model.state_dict().values(), *moments]) / 1024
    assert info.value.errno == errno.ENOSPC
    assert f"no space left writing the checkpoint of iteration 3 to {checkpointer.dir}: it needs about " in str(
        info.value
    )
    assert f"{needed:.1f} KiB (model and optimizer state) and " in str(info.value) and "are free there" in str(
        info.value
    )
    assert temporaries(small_disk) == [] and list(checkpointer.dir.iterdir()) == []


def test_a_torch_save_that_fills_the_disk_says_so_instead_of_unexpected_pos(small_disk):
    with pytest.raises(OSError, match=r"no space left writing .*big\.pth: .* were written .*it needs about 1\.0 MiB"):
        atomic_torch_save({"w": torch.zeros(1 << 18)}, small_disk / "big.pth")
    assert list(small_disk.iterdir()) == []


def _fill(disk: Path) -> None:
    try:
        with open(disk / "filler", "wb", buffering=0) as handle:
            while True:
                handle.write(b"\0" * 4096)
    except OSError:
        pass


def test_a_metrics_append_and_a_teacher_export_on_a_full_disk_name_the_file(small_disk):
    writer = MetricsWriter(small_disk / "training_metrics.json")
    _fill(small_disk)
    with pytest.raises(
        OSError, match=r"no space left writing .*training_metrics\.json: .* are free in .*; it needs"
    ) as info:
        writer.write({"iteration": 0, "total_loss": 1.0, "note": "x" * 8192})
    assert info.value.errno == errno.ENOSPC
    export = teacher_export_path(small_disk, 3)
    with pytest.raises(OSError, match=r"no space left writing .*teacher_checkpoint\.pth: .* it needs about"):
        save_teacher_release({"dino_head.w": torch.zeros(1 << 16)}, {}, export, block_chunks=0)
    assert temporaries(small_disk) == []


# ------------------------------------------------------------------------------------------ checkpoint fallback


@pytest.fixture
def saved(tmp_path):
    """A checkpoint folder with iterations 3 and 6 of a tiny model whose weights differ between the two."""
    cfg = load_config(None, TINY_MODEL)
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    optimizer = torch.optim.AdamW(model.student.parameters())
    checkpointer = TrainingCheckpointer(tmp_path, keep=3)
    weights = {}
    for iteration in (3, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        checkpointer.save(iteration, model, optimizer)
        weights[iteration] = {k: v.clone() for k, v in model.state_dict().items()}
    save_config(cfg, tmp_path / "config.yaml")
    return checkpointer, cfg, weights


class _Unsafe:
    def __reduce__(self):
        return (print, ("this must never run",))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _unsafe(path: Path) -> None:
    torch.save({"model": _Unsafe(), "iteration": 6}, path)


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "without_record"])
@pytest.mark.parametrize("damage", [_truncate, _empty, _unsafe], ids=["truncated", "empty", "unsafe_pickle"])
@pytest.mark.slow
def test_resume_falls_back_to_the_older_checkpoint_and_moves_the_damaged_one_aside(saved, damage, recorded, capsys):
    """With its record, the digest check finds the damage; without (an older franca's file), the reader does."""
    checkpointer, cfg, weights = saved
    newest = checkpointer.dir / "model_0000006.pth"
    if not recorded:
        record_path(newest).unlink()
    damage(newest)
    model = SSLMetaArch(cfg)
    loaded = checkpointer.resume(model, torch.optim.AdamW(model.student.parameters()))
    assert loaded.iteration == 3
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights[3].items())
    out = capsys.readouterr().out
    if recorded:
        assert f"WARNING: {newest} fails its integrity check: {newest} has SHA-256" in out
        assert (checkpointer.dir / "model_0000006.pth.unreadable.record.json").is_file()
    else:
        said = (
            (f"WARNING: {newest} (", "is not a readable checkpoint")
            if damage is not _unsafe
            else (
                f"WARNING: refusing to load {newest}",
                "weights-only",
            )
        )
        assert all(part in out for part in said)
    assert "this must never run" not in out
    assert not newest.exists() and (checkpointer.dir / "model_0000006.pth.unreadable").is_file()
    assert [it for it, _ in list_checkpoints(checkpointer.dir)] == [3]


def test_when_no_checkpoint_reads_the_error_lists_them_and_nothing_moves(saved):
    checkpointer, cfg, _ = saved
    for iteration in (3, 6):
        _truncate(checkpointer.dir / f"model_{iteration:07d}.pth")
    model = SSLMetaArch(cfg)
    with pytest.raises(UnreadableCheckpointError, match="no readable checkpoint") as info:
        checkpointer.resume(model, torch.optim.AdamW(model.student.parameters()))
    assert "model_0000006.pth" in str(info.value) and "model_0000003.pth" in str(info.value)
    assert [it for it, _ in list_checkpoints(checkpointer.dir)] == [3, 6]


def test_a_checkpoint_of_another_config_stops_instead_of_falling_back(saved):
    checkpointer, _, _ = saved
    other = SSLMetaArch(load_config(None, [*TINY_MODEL, "student.embed_dim=64", "student.num_heads=4"]))
    with pytest.raises(CheckpointMismatchError, match="does not fit the configured model"):
        checkpointer.resume(other, torch.optim.AdamW(other.student.parameters()))
    assert [it for it, _ in list_checkpoints(checkpointer.dir)] == [3, 6]


@pytest.mark.slow
def test_a_dcp_folder_without_metadata_falls_back(saved, capsys):
    checkpointer, cfg, weights = saved
    model = SSLMetaArch(cfg)
    optimizer = torch.optim.AdamW(model.student.parameters())
    (_save_dcp(checkpointer, model, optimizer, 9) / ".metadata").unlink()
    loaded = checkpointer.resume(model, optimizer)
    assert loaded.iteration == 6
    assert "DCP metadata" in capsys.readouterr().out
    assert (checkpointer.dir / "dcp_0000009.unreadable").is_dir()


def _save_dcp(checkpointer: TrainingCheckpointer, model, optimizer, iteration: int) -> Path:
    """A single-process DCP folder as several ranks write it (model + optimizer, train state, this rank's RNG)."""
    folder = checkpointer.dir / f"dcp_{iteration:07d}"
    dcp.save(model_and_optimizer_state(model, optimizer), checkpoint_id=str(folder), no_dist=True)
    torch.save({"iteration": iteration, "world_size": 2, "config": ""}, folder / TRAIN_STATE_FILE)
    return folder


@pytest.mark.slow
def test_a_truncated_dcp_shard_falls_back_in_resume_and_consolidate(saved, tmp_path, capsys):
    checkpointer, cfg, weights = saved
    model = SSLMetaArch(cfg)
    optimizer = torch.optim.AdamW(model.student.parameters())
    folder = _save_dcp(checkpointer, model, optimizer, 9)
    for shard in folder.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    assert consolidate_main([str(checkpointer.dir.parent), str(tmp_path / "out")]) == 0
    assert "dcp_0000009" in capsys.readouterr().err and folder.is_dir()
    loaded = checkpointer.resume(model, optimizer)
    assert loaded.iteration == 6
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights[6].items())
    assert "cannot read the tensors" in capsys.readouterr().out
    assert (checkpointer.dir / "dcp_0000009.unreadable").is_dir()


def test_a_storage_error_is_not_taken_for_damage(saved, monkeypatch):
    checkpointer, cfg, _ = saved

    def failing_load(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(torch, "load", failing_load)
    model = SSLMetaArch(cfg)
    with pytest.raises(OSError, match="Input/output error"):
        checkpointer.resume(model, torch.optim.AdamW(model.student.parameters()))
    assert [it for it, _ in list_checkpoints(checkpointer.dir)] == [3, 6]  # nothing moved aside


def test_consolidate_falls_back_without_touching_the_run(saved, tmp_path, capsys):
    checkpointer, _, weights = saved
    _truncate(checkpointer.dir / "model_0000006.pth")
    assert consolidate_main([str(checkpointer.dir.parent), str(tmp_path / "out")]) == 0
    assert "model_0000006.pth" in capsys.readouterr().err
    release = torch.load(tmp_path / "out" / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    assert torch.equal(
        release["dino_head.matryoshka_projections.0.weight"],
        weights[3]["teacher.dino_head.matryoshka_projections.0.weight"],
    )
    assert (checkpointer.dir / "model_0000006.pth").is_file()
    _truncate(checkpointer.dir / "model_0000003.pth")
    with pytest.raises(SystemExit):
        consolidate_main([str(checkpointer.dir.parent), str(tmp_path / "out2")])
    assert "no readable checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ metrics file


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    path = tmp_path / "training_metrics.json"
    lines = [json.dumps({"iteration": i, "total_loss": 1.0}) for i in range(5)]
    path.write_text("\n".join(lines) + '\n{"iteration": 5, "tot')
    writer = MetricsWriter(path, resume_iteration=3)
    assert "dropped line 6" in capsys.readouterr().out
    writer.write({"iteration": 3, "total_loss": 2.0})
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------------------ MODEL.WEIGHTS


@pytest.mark.slow
def test_model_weights_continues_a_run_in_a_new_folder(tiny_config, tmp_path):
    first = tmp_path / "first"
    trainer.main(["--config-file", str(tiny_config), "--output-dir", str(first), "optim.epochs=2"])
    weights = first / "checkpoints" / "model_0000006.pth"
    branch = tmp_path / "branch"
    trainer.main(["--config-file", str(tiny_config), "--output-dir", str(branch), f"MODEL.WEIGHTS={weights}"])
    iterations = [json.loads(line)["iteration"] for line in (branch / "training_metrics.json").read_text().splitlines()]
    assert iterations == [6, 7, 8]


@pytest.mark.slow
def test_high_resolution_finetune_restarts_at_zero_with_resized_grids(tiny_config, tmp_path, capsys):
    first = tmp_path / "first"
    trainer.main(["--config-file", str(tiny_config), "--output-dir", str(first), "optim.epochs=1"])
    weights = first / "checkpoints" / "model_0000003.pth"
    out = tmp_path / "highres"
    overrides = [f"MODEL.WEIGHTS={weights}", "train.high_resolution_finetune=true", "crops.global_crops_size=24"]
    trainer.main(["--config-file", str(tiny_config), "--output-dir", str(out), "optim.epochs=1", *overrides])
    assert "restarting at iteration 0 with a fresh optimizer" in capsys.readouterr().out
    iterations = [json.loads(line)["iteration"] for line in (out / "training_metrics.json").read_text().splitlines()]
    assert iterations == [0, 1, 2]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["MODEL.WEIGHTS=/nonexistent/model_0000003.pth"], "MODEL.WEIGHTS='/nonexistent/model_0000003.pth' does not"),
        (["train.high_resolution_finetune=true"], "needs MODEL.WEIGHTS"),
        (["MODEL.WEIGHTS=a.pth", "student.pretrained_weights=b.pth"], "are both set"),
    ],
)
def test_model_weights_errors_name_the_key(tiny_config, tmp_path, overrides, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        trainer.main(["--config-file", str(tiny_config), "--output-dir", str(tmp_path / "run"), *overrides])


def test_an_unsafe_model_weights_file_is_refused_not_ignored(tiny_config, tmp_path, capsys):
    evil = tmp_path / "model_0000003.pth"
    _unsafe(evil)
    with pytest.raises(UnreadableCheckpointError, match="MODEL.WEIGHTS: refusing to load .*weights-only"):
        trainer.main(
            ["--config-file", str(tiny_config), "--output-dir", str(tmp_path / "run"), f"MODEL.WEIGHTS={evil}"]
        )
    assert "this must never run" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------- a run killed repeatedly

# Runs the trainer with every checkpoint write slowed down after its first half is on disk, so a test can kill
# the process while the temporary file exists.
SLOW_SAVE_LAUNCHER = """
import io, sys, time
import torch
real_save = torch.save
def slow_save(obj, f, *args, **kwargs):
    if isinstance(f, (str, bytes)) or not hasattr(f, "write"):
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    time.sleep(1.0)
    f.write(data[len(data) // 2 :])
torch.save = slow_save
from franca.train.train import main
main(sys.argv[1:])
"""


def _half_written(checkpoints: Path, iteration: int) -> bool:
    return any(p.name.startswith(f".model_{iteration:07d}.pth.tmp.") for p in checkpoints.glob(".*"))


def _wait_for(predicate, proc, seconds=300.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.005)
    return False


@pytest.mark.slow
def test_a_run_killed_repeatedly_while_checkpointing_restarts_unattended(tiny_config, tmp_path):
    full = tmp_path / "full"
    trainer.main(["--config-file", str(tiny_config), "--output-dir", str(full)])
    reference = json.loads((full / "training_metrics.json").read_text().splitlines()[-1])

    out = tmp_path / "killed"
    command = [sys.executable, "-c", SLOW_SAVE_LAUNCHER, "--config-file", str(tiny_config), "--output-dir", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    checkpoints = out / "checkpoints"
    rng = random.Random(0)
    kills_during_write = 0
    logs = []
    for attempt in range(3):
        logs.append(tmp_path / f"attempt{attempt}.log")
        with open(logs[-1], "w") as log:
            proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        if attempt < 2:  # kill while the temporary file of checkpoint 3, then 6, is half written
            kills_during_write += _wait_for(partial(_half_written, checkpoints, 3 * (attempt + 1)), proc)
        else:  # kill at a random moment after the first log line of this attempt
            _wait_for(lambda: (out / "training_metrics.json").exists(), proc)
            time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert kills_during_write == 2, "\n".join(f"{log.name}:\n{log.read_text()[-1500:]}" for log in logs)
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert temporaries(out) == []
    final = json.loads((out / "training_metrics.json").read_text().splitlines()[-1])
    assert final["iteration"] == reference["iteration"] == 8
    assert final["total_loss"] == pytest.approx(reference["total_loss"], rel=1e-6, abs=1e-7)
