"""A run folder belongs to one run (training.md, "Output folder"): the folder lock, ranks that stop with their
launcher, the run identity and ``--no-resume``, config changes on resume and their record, checkpoint integrity, and
what the NaN guard says after a resume."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_MODEL, free_port
from omegaconf import OmegaConf

from franca.checkpoint import TrainingCheckpointer, list_checkpoints
from franca.checkpoint import distributed as checkpoint_distributed
from franca.checkpoint.consolidate import main as consolidate_main
from franca.checkpoint.records import read_record, record_path, write_record
from franca.train import run_folder
from franca.train import train as trainer
from franca.train.config import load_config
from franca.train.nonfinite import NonFiniteLossError
from franca.train.run_folder import ConfigChangedError, model_config, open_run
from franca.train.ssl_meta_arch import SSLMetaArch
from franca.utils.digest import file_sha256
from franca.utils.folder_lock import FolderBusyError, acquire_folder_lock, release_folder_lock

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

# ------------------------------------------------------------------------------------------------- the folder lock

HOLD_LOCK = (
    "import sys, time\nfrom franca.utils.folder_lock import acquire_folder_lock\n"
    "acquire_folder_lock(sys.argv[1]); print('locked', flush=True); time.sleep(120)"
)
TRY_LOCK = (
    "import sys\nfrom franca.utils.folder_lock import FolderBusyError, acquire_folder_lock\n"
    "try:\n    acquire_folder_lock(sys.argv[1])\nexcept FolderBusyError as err:\n    print(err); sys.exit(3)"
)


def test_a_second_process_is_refused_naming_the_folder_and_the_holder_and_the_lock_dies_with_it(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(folder)], env=ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderBusyError) as info:
            acquire_folder_lock(folder)
        assert str(info.value).startswith(f"{folder} is in use by another run (host {socket.gethostname()}, ")
        assert f"pid {holder.pid}, started " in str(info.value) and "another --output-dir" in str(info.value)
    finally:
        holder.kill()
        holder.wait()
    acquire_folder_lock(folder)  # the kernel released the dead holder's lock
    try:
        refused = subprocess.run([sys.executable, "-c", TRY_LOCK, str(folder)], env=ENV, capture_output=True, text=True)
        assert refused.returncode == 3 and f"pid {os.getpid()}" in refused.stdout
        assert acquire_folder_lock(folder) is acquire_folder_lock(folder), "the holder may lock its folder again"
    finally:
        release_folder_lock(folder)
    free = subprocess.run([sys.executable, "-c", TRY_LOCK, str(folder)], env=ENV, capture_output=True, text=True)
    assert free.returncode == 0, free.stdout + free.stderr


# The trainer in a subprocess, its steps held while DIR/hold exists, so a test decides when it may finish.
HELD_TRAINER = """
import sys, time
from pathlib import Path
from franca.train.ssl_meta_arch import SSLMetaArch
hold = Path(sys.argv[sys.argv.index("--output-dir") + 1]) / "hold"
step = SSLMetaArch.forward_backward
def held_step(self, *args, **kwargs):
    while hold.exists():
        time.sleep(0.05)
    return step(self, *args, **kwargs)
SSLMetaArch.forward_backward = held_step
from franca.train.train import main
main(sys.argv[1:])
"""


def _metrics(out: Path) -> list[int]:
    path = out / "training_metrics.json"
    return [json.loads(line)["iteration"] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_a_second_trainer_on_a_folder_in_use_stops_at_once_and_the_first_finishes_unharmed(tiny_config, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "hold").touch()
    argv = ["--config-file", str(tiny_config), "--output-dir", str(out), "optim.epochs=1", "train.log_period=1"]
    first = subprocess.Popen([sys.executable, "-c", HELD_TRAINER, *argv], env=ENV, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / ".lock").exists() or not (out / ".lock").read_text():  # the holder is written once it locked
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-2000:]
        time.sleep(0.05)
    second = subprocess.run(
        [sys.executable, "-m", "franca.train", *argv], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert second.returncode != 0 and first.poll() is None
    assert f"FolderBusyError: {out} is in use by another run (host {socket.gethostname()}, pid {first.pid}" in (
        second.stderr
    )
    (out / "hold").unlink()
    stdout, _ = first.communicate(timeout=300)
    assert first.returncode == 0, stdout[-2000:]
    assert _metrics(out) == [0, 1, 2] and [it for it, _ in list_checkpoints(out / "checkpoints")] == [3]


TINY_TWO_RANKS = """
dino: {head_n_prototypes: 64, head_bottleneck_dim: 16, head_hidden_dim: 32, mrl_l2_norm: true, koleo_loss_weight: 0.0}
ibot: {separate_head: true, head_n_prototypes: 64, head_bottleneck_dim: 16, head_hidden_dim: 32}
train: {dataset_path: "FashionMNIST:root=bundled:split=train", OFFICIAL_EPOCH_LENGTH: 3, num_workers: 0,
        log_period: 1, batch_size_per_gpu: 4}
student: {arch: vit_tiny, embed_dim: 32, depth: 2, num_heads: 2, patch_size: 4}
optim: {epochs: 50, warmup_epochs: 1}
crops: {global_crops_size: 16, local_crops_size: 8, local_crops_number: 2}
evaluation: {eval_period_iterations: 0}
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.mark.slow
def test_ranks_whose_launcher_was_killed_checkpoint_stop_and_free_the_folder(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_TWO_RANKS)
    out = tmp_path / "run"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port"]
    command = [
        *launcher,
        str(free_port()),
        "-m",
        "franca.train",
        "--config-file",
        str(config),
        "--output-dir",
        str(out),
    ]
    with open(tmp_path / "torchrun.log", "w") as log:
        torchrun = subprocess.Popen(command, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not _metrics(out) and torchrun.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = [
        int(pid)
        for pid in subprocess.run(["pgrep", "-P", str(torchrun.pid)], capture_output=True, text=True).stdout.split()
    ]
    assert len(workers) == 2, (tmp_path / "torchrun.log").read_text()[-3000:]
    torchrun.kill()  # SIGKILL: the launcher cannot forward anything
    torchrun.wait()
    deadline = time.monotonic() + 240
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    logs = (tmp_path / "torchrun.log").read_text()
    assert not any(_alive(pid) for pid in workers), logs[-3000:]
    assert "the launcher (pid" in logs and "is gone: this rank checkpoints and stops" in logs
    saved = list_checkpoints(out / "checkpoints")
    assert saved and saved[-1][1].name == f"dcp_{max(_metrics(out)) + 1:07d}", (saved, logs[-3000:])
    acquire_folder_lock(out)  # a requeued job finds the folder free
    release_folder_lock(out)


@pytest.mark.slow
def test_sigint_checkpoints_and_stops_like_sigterm(tiny_config, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "franca.train", "--config-file", str(tiny_config), "--output-dir", str(out)]
    proc = subprocess.Popen([*command, "optim.epochs=50"], env=ENV, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not _metrics(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, stdout[-2000:]
    assert "received SIGINT: checkpointing after this iteration" in stdout
    assert "run the same command again to resume" in stdout
    last = max(_metrics(out))
    assert [it for it, _ in list_checkpoints(out / "checkpoints")][-1] == last + 1


# -------------------------------------------------------------------------------- run identity and config history


def tiny_config_for(out: Path, *overrides: str):
    cfg = load_config(None, [*TINY_MODEL, *overrides])
    cfg.train.output_dir = str(out)
    return cfg


@pytest.fixture
def model_and_optimizer():
    torch.manual_seed(0)
    model = SSLMetaArch(load_config(None, TINY_MODEL))
    return model, torch.optim.AdamW(model.student.parameters())


def _run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def shaped(*overrides: str, world_size: int = 1) -> dict:
    return model_config(OmegaConf.to_container(load_config(None, [*TINY_MODEL, *overrides])), world_size)


def test_model_shaping_keys_compare_the_global_batch_and_leave_out_execution_keys():
    free = ["train.log_period=3", "train.num_workers=1", "evaluation.eval_period_iterations=5", "train.output_dir=x"]
    assert shaped(*free) == shaped()
    assert shaped("train.batch_size_per_gpu=32", world_size=2) == shaped(), "2 x 32 images are the global batch 64"
    assert shaped("optim.base_lr=0.002", "train.seed=4") == {**shaped(), "optim.base_lr": 0.002, "train.seed": 4}
    assert "optim.lr" not in shaped() and shaped()["train.global_batch_size"] == 64


@pytest.mark.slow
def test_no_resume_moves_the_previous_run_aside_and_resume_takes_only_its_own_lineage(
    tmp_path, model_and_optimizer, capsys
):
    model, optimizer = model_and_optimizer
    out = tmp_path / "run"
    first = open_run(tiny_config_for(out), 1)
    TrainingCheckpointer(out, keep=3, run=first).save(3, model, optimizer)
    TrainingCheckpointer(out, keep=3, run=first).save(6, model, optimizer)
    (out / "eval" / "training_6").mkdir(parents=True)

    run_folder.lock_run_folder(out, start_over=True)  # --no-resume
    second = open_run(tiny_config_for(out), 1, resume=False)
    assert second.run_id != first.run_id
    previous = out / "previous_runs" / first.run_id
    assert sorted(p.name for p in previous.iterdir()) == sorted(
        ["checkpoints", "eval", "config.yaml", "config_history", "run.json"]
    )
    assert [it for it, _ in list_checkpoints(previous / "checkpoints")] == [3, 6]
    assert not (out / "checkpoints").exists() and not (out / "eval").exists()
    assert _run_json(out)["run_id"] == second.run_id

    checkpointer = TrainingCheckpointer(out, keep=3, run=second)
    checkpointer.save(3, model, optimizer)
    for name in ("model_0000006.pth", "model_0000006.pth.record.json"):  # the old run's newer checkpoint, copied back
        (out / "checkpoints" / name).write_bytes((previous / "checkpoints" / name).read_bytes())
    loaded = TrainingCheckpointer(out, keep=3, run=run_folder.open_run(tiny_config_for(out), 1)).resume(
        model, optimizer
    )
    assert loaded.iteration == 3 and loaded.verified
    said = capsys.readouterr().out
    assert (
        f"not resuming from {out / 'checkpoints' / 'model_0000006.pth'}: it was written by run {first.run_id}" in said
    )
    TrainingCheckpointer(out, keep=1, run=second).save(9, model, optimizer)  # prunes its own 3, not the other's 6
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pth")) == ["model_0000006.pth", "model_0000009.pth"]
    run_folder.release_run_folders()


@pytest.mark.slow
def test_after_no_resume_a_plain_rerun_resumes_its_own_run_not_the_longer_one_before(tiny_config, tmp_path):
    out = tmp_path / "run"
    argv = ["--config-file", str(tiny_config), "--output-dir", str(out)]
    trainer.main([*argv, "optim.epochs=2"])  # the longer run: checkpoints 3 and 6, export training_6
    old_run = _run_json(out)["run_id"]
    trainer.main([*argv, "--no-resume", "optim.epochs=1"])
    trainer.main([*argv, "optim.epochs=1"])  # the same command again: resumes at 3, nothing left to train
    assert _metrics(out) == [0, 1, 2]
    assert [it for it, _ in list_checkpoints(out / "checkpoints")] == [3]
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["training_0", "training_3"]  # initial teacher, final
    assert [it for it, _ in list_checkpoints(out / "previous_runs" / old_run / "checkpoints")] == [3, 6]
    teacher = torch.load(out / "eval" / "training_3" / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    state = torch.load(out / "checkpoints" / "model_0000003.pth", weights_only=True)["model"]
    head = "dino_head.matryoshka_projections.0.weight"
    assert torch.equal(teacher[head], state[f"teacher.{head}"]), "the export is this run's teacher"


def test_a_config_change_on_resume_stops_with_the_diff_and_the_override_records_it(tmp_path, model_and_optimizer):
    model, optimizer = model_and_optimizer
    out = tmp_path / "run"
    run = open_run(tiny_config_for(out), 1)
    TrainingCheckpointer(out, keep=2, run=run).save(6, model, optimizer)
    recorded = (out / "config.yaml").read_text()

    changed = ["optim.base_lr=0.002", "train.batch_size_per_gpu=32"]
    with pytest.raises(ConfigChangedError) as info:
        open_run(tiny_config_for(out, *changed), 1)
    message = str(info.value)
    assert "model_0000006.pth (iteration 6) with a config that changes the trained model" in message
    assert "  optim.base_lr: 0.004 -> 0.002\n  train.global_batch_size: 64 -> 32\n" in message
    assert str(out / "config_history" / "config_0000000.yaml") in message and "--allow-config-change" in message
    assert (out / "config.yaml").read_text() == recorded and len(_run_json(out)["configs"]) == 1, "nothing written"

    open_run(tiny_config_for(out, "train.log_period=7"), 1)  # execution keys change freely, and are kept
    open_run(tiny_config_for(out, *changed), 1, allow_config_change=True)
    configs = _run_json(out)["configs"]
    assert [entry["iteration"] for entry in configs] == [0, 6, 6]
    assert "changes" not in configs[1] and configs[2]["allowed_by"] == "--allow-config-change"
    assert configs[2]["changes"] == {"optim.base_lr": [0.004, 0.002], "train.global_batch_size": [64, 32]}
    history = sorted(p.name for p in (out / "config_history").iterdir())
    assert history == ["config_0000000.yaml", "config_0000006.1.yaml", "config_0000006.yaml"]
    assert (out / "config_history" / "config_0000000.yaml").read_text() == recorded, "never overwritten"
    assert "base_lr: 0.002" in (out / "config.yaml").read_text()


def test_checkpoints_of_an_older_franca_are_adopted_by_the_folders_first_run(tmp_path, model_and_optimizer, capsys):
    model, optimizer = model_and_optimizer
    out = tmp_path / "run"
    TrainingCheckpointer(out).save(3, model, optimizer)
    record_path(out / "checkpoints" / "model_0000003.pth").unlink()  # written before records existed
    run = open_run(tiny_config_for(out), 1)
    assert "recorded 1 checkpoint(s) written before run records as checkpoints of run" in capsys.readouterr().out
    record = read_record(out / "checkpoints" / "model_0000003.pth")
    assert record.run_id == run.run_id and record.adopted and record.config is None
    assert TrainingCheckpointer(out, run=run).resume(model, optimizer).iteration == 3


# ------------------------------------------------------------------------------------------ checkpoint integrity


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_checkpoint_file_is_caught_and_resume_falls_back(tmp_path, model_and_optimizer, capsys):
    model, optimizer = model_and_optimizer
    run = open_run(tiny_config_for(tmp_path), 1)
    checkpointer = TrainingCheckpointer(tmp_path, keep=3, run=run)
    checkpointer.save(3, model, optimizer)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    checkpointer.save(6, model, optimizer)
    newest = checkpointer.dir / "model_0000006.pth"
    _flip_a_bit(newest)
    torch.load(newest, weights_only=True)  # the damage reads without complaint: only the digest shows it
    loaded = TrainingCheckpointer(tmp_path, keep=3, run=run).resume(model, optimizer)
    assert loaded.iteration == 3 and loaded.verified
    assert f"WARNING: {newest} fails its integrity check: {newest} has SHA-256" in capsys.readouterr().out
    assert (checkpointer.dir / "model_0000006.pth.unreadable").is_file()
    assert (checkpointer.dir / "model_0000006.pth.unreadable.record.json").is_file()


@pytest.fixture
def as_two_ranks(monkeypatch):
    """The checkpointer's several-process path (DCP folders) in this one process: collectives are no-ops here."""
    monkeypatch.setattr(checkpoint_distributed, "get_world_size", lambda: 2)


@pytest.mark.slow
def test_a_flipped_bit_in_a_dcp_shard_is_caught_in_resume_and_consolidate(
    tmp_path, model_and_optimizer, as_two_ranks, capsys
):
    model, optimizer = model_and_optimizer
    run = open_run(tiny_config_for(tmp_path), 2)
    checkpointer = TrainingCheckpointer(tmp_path, keep=3, run=run)
    for iteration in (3, 6):
        checkpointer.save(iteration, model, optimizer)
    newest = checkpointer.dir / "dcp_0000006"
    record = read_record(newest)
    assert sorted(record.files) == sorted(p.name for p in newest.iterdir() if p.name != "record.json")
    assert {"__0_0.distcp", ".metadata", "train_state.pth", "rng_rank0.pth"} <= set(record.files)
    _flip_a_bit(newest / "__0_0.distcp")
    assert consolidate_main([str(tmp_path), str(tmp_path / "release")]) == 0
    assert "dcp_0000006 fails its integrity check" in capsys.readouterr().err
    loaded = TrainingCheckpointer(tmp_path, keep=3, run=run).resume(model, optimizer)
    assert loaded.iteration == 3
    assert "__0_0.distcp has SHA-256" in capsys.readouterr().out
    assert (checkpointer.dir / "dcp_0000006.unreadable" / "record.json").is_file()


# ---------------------------------------------------------------------------------------------- the NaN guard


def _poison_from(monkeypatch, first_call: int) -> None:
    original = SSLMetaArch.student_losses
    calls = []

    def poisoned(self, *args, **kwargs):
        losses = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) >= first_call:
            losses["ibot_loss"] = losses["ibot_loss"] * float("nan")
        return losses

    monkeypatch.setattr(SSLMetaArch, "student_losses", poisoned)


@pytest.mark.slow
def test_a_nan_right_after_resume_says_whether_the_checkpoint_itself_is_nonfinite(tiny_config, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = ["--config-file", str(tiny_config), "--output-dir", str(out)]
    trainer.main([*argv, "train.stop_at_iteration=3"])
    checkpoint = out / "checkpoints" / "model_0000003.pth"

    with monkeypatch.context() as patch:
        _poison_from(patch, first_call=1)
        with pytest.raises(NonFiniteLossError) as info:
            trainer.main(argv)
    message = str(info.value)
    assert "ibot_loss=nan since iteration 3" in message
    assert "No checkpoint of this run has yet passed its integrity check and been followed by finite steps" in message
    assert f"resumed from {checkpoint} and its first step was already non-finite, although that checkpoint's " in (
        message
    )

    state = torch.load(checkpoint, weights_only=True)
    name = next(k for k in state["model"] if k.startswith("teacher.backbone.") and k.endswith("weight"))
    state["model"][name][0] = float("nan")  # a checkpoint saved after a divergence: its record matches its bytes
    torch.save(state, checkpoint)
    record = read_record(checkpoint)
    write_record(checkpoint, dataclasses.replace(record, files={checkpoint.name: file_sha256(checkpoint)}))
    with pytest.raises(NonFiniteLossError) as info:
        trainer.main(argv)
    assert f"resumed from {checkpoint}, whose own tensors hold non-finite values (model.{name})" in str(info.value)
