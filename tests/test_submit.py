"""The SLURM launcher: dry-run parameters, the sbatch script submitit writes, requeue with the same command, and a
real (tiny) training through submitit's DebugExecutor and through a simulated preemption signal."""

import json
import os
import signal
import threading

import pytest
import torch

from franca.run import submit
from franca.utils.config_schema import ConfigError


def _printed_parameters(text: str) -> dict:
    line = next(line for line in text.splitlines() if line.startswith("executor parameters: "))
    return json.loads(line.removeprefix("executor parameters: "))


def test_dry_run_prints_one_task_per_gpu_and_the_trainer_command(tiny_config, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    slurm = ["--nodes", "3", "--ngpus", "4", "--partition", "gpu", "--timeout", "90", "--account", "proj", "--qos",
             "high", "--constraint", "h100", "--exclude", "node[01-02]", "--comment", "franca run"]  # fmt: skip
    trainer = ["--config-file", "tiny.yaml", "--output-dir", "run", "--no-resume", "--allow-config-change"]
    trainer.append("optim.base_lr=0.02")
    argv = slurm + trainer + ["--dry-run"]
    assert submit.main(argv) == 0
    out = capsys.readouterr().out
    parameters = _printed_parameters(out)
    assert parameters["nodes"] == 3
    assert parameters["tasks_per_node"] == 4 and parameters["gpus_per_node"] == 4
    assert parameters["timeout_min"] == 90
    expected = {"slurm_partition": "gpu", "slurm_account": "proj", "slurm_qos": "high", "slurm_constraint": "h100"}
    assert {key: parameters[key] for key in expected} == expected
    assert parameters["slurm_exclude"] == "node[01-02]" and parameters["slurm_comment"] == "franca run"
    command = next(line for line in out.splitlines() if "tasks runs:" in line)
    assert "each of the 12 tasks runs:" in command
    flags = f"--config-file {tiny_config} --output-dir {tmp_path / 'run'} --no-resume --allow-config-change"
    assert f"-m franca.train {flags}" in command
    assert command.endswith("optim.base_lr=0.02")
    # 12 processes x 8 images; lr = base_lr * sqrt(96 / 1024), written out here
    assert "global batch 96," in out and f"lr {0.02 * (96 / 1024) ** 0.5:.3g} " in out
    assert f"logs): {tmp_path / 'run' / 'slurm' / '%j'}" in out
    assert "dry run: nothing submitted" in out
    assert not (tmp_path / "run").exists()


def test_bad_arguments_fail_before_submission(tiny_config, tmp_path):
    base = ["--config-file", str(tiny_config), "--output-dir", str(tmp_path / "run"), "--dry-run"]
    with pytest.raises(ConfigError, match="epochz"):
        submit.plan_launch(base + ["optim.epochz=3"])
    with pytest.raises(ValueError, match="--ngpus=0 must be >= 1"):
        submit.plan_launch(base + ["--ngpus", "0"])
    with pytest.raises(ValueError, match="one process on this machine"):
        submit.plan_launch(base + ["--cluster", "local", "--ngpus", "2"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        submit.plan_launch(["--config-file", str(tmp_path / "missing.yaml"), "--output-dir", str(tmp_path)])


def test_submitit_writes_the_expected_sbatch_script(tiny_config, tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    plan = submit.plan_launch(
        [
            "--nodes",
            "2",
            "--ngpus",
            "4",
            "--partition",
            "gpu",
            "--timeout",
            "90",
            "--signal-delay",
            "150",
            "--config-file",
            str(tiny_config),
            "--output-dir",
            str(tmp_path / "run"),
        ]  # fmt: skip
    )
    executor = submitit.AutoExecutor(folder=plan.folder, cluster="slurm", slurm_max_num_timeout=plan.max_requeues)
    executor.update_parameters(**plan.parameters)
    script = executor._executor._make_submission_file_text("COMMAND", "uid")
    for line in ["--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--time=90",
                 "--signal=USR2@150", f"--output={tmp_path}/run/slurm/%j/%j_0_log.out"]:  # fmt: skip
        assert f"#SBATCH {line}\n" in script
    assert "srun" in script and "COMMAND" in script


def test_checkpoint_resubmits_the_same_command_without_no_resume(monkeypatch):
    pytest.importorskip("submitit")
    argv = ["--config-file", "/c.yaml", "--output-dir", "/run", "--no-resume", "optim.epochs=3"]
    job = submit.TrainingJob(argv)
    delayed = job.checkpoint()
    assert isinstance(delayed.function, submit.TrainingJob)
    assert delayed.function.trainer_argv == ["--config-file", "/c.yaml", "--output-dir", "/run", "optim.epochs=3"]
    assert delayed.args == () and delayed.kwargs == {}
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert job.argv_for_this_start() == argv
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert "--no-resume" not in job.argv_for_this_start()


@pytest.mark.slow
def test_debug_executor_runs_the_training(tiny_config, tmp_path, capsys):
    pytest.importorskip("submitit")
    out_dir = tmp_path / "run"
    argv = ["--cluster", "debug", "--ngpus", "0", "--config-file", str(tiny_config), "--output-dir", str(out_dir)]
    argv.append("optim.epochs=1")
    assert submit.main(argv) == 0
    assert "finished" in capsys.readouterr().out
    records = [json.loads(line) for line in (out_dir / "training_metrics.json").read_text().splitlines()]
    assert records[-1]["iteration"] == 2
    state = torch.load(out_dir / "checkpoints" / "model_0000003.pth", weights_only=True)
    assert state["iteration"] == 3
    assert (out_dir / "eval" / "training_3" / "teacher_checkpoint.pth").is_file()


@pytest.mark.slow
def test_preemption_signal_checkpoints_then_hands_over_to_submitit(tiny_config, tmp_path, monkeypatch):
    """Simulates a submitit task: a handler on USR2 stands for submitit's checkpoint-and-requeue handler."""
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    out_dir = tmp_path / "run"
    calls = []

    def fake_submitit_handler(signum, frame):
        calls.append((signum, sorted(p.name for p in (out_dir / "checkpoints").glob("model_*.pth"))))
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, fake_submitit_handler)
    previous_usr1, previous_term = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(4.0, os.kill, (os.getpid(), signal.SIGUSR2))
    try:
        job = submit.TrainingJob(["--config-file", str(tiny_config), "--output-dir", str(out_dir), "optim.epochs=400"])
        timer.start()
        with pytest.raises(SystemExit) as stopped:
            job()
        assert stopped.value.code == -1
        assert signal.getsignal(signal.SIGUSR2) is fake_submitit_handler
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR2, previous)
        signal.signal(signal.SIGUSR1, previous_usr1)
        signal.signal(signal.SIGTERM, previous_term)
    assert len(calls) == 1 and calls[0][0] == signal.SIGUSR2
    saved = calls[0][1]
    assert saved, "the trainer must have written its checkpoint before submitit requeues"
    iteration = torch.load(out_dir / "checkpoints" / saved[-1], weights_only=True)["iteration"]
    assert 0 < iteration < 1200
