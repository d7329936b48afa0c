"""The trainer under ``torchrun --nproc-per-node 2`` (gloo, CPU) against one process, across resumes and SIGTERM.

Comparable runs: the global batch of 8 images and its iBOT masks (drawn for the global batch from (seed, iteration))
are the same for every world size, and stochastic depth is off. KoLeo stays off: like the original, it takes each
CLS token's nearest neighbour within the rank's own batch (docs/deviations.md), so its value, and through its gradient
every later loss, rightly changes with the world size.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import free_port

from franca.checkpoint.consolidate import main as consolidate_main
from franca.checkpoint.records import read_record
from franca.hub import load_backbone

pytestmark = pytest.mark.slow  # every test here trains or launches ranks

REPO = Path(__file__).resolve().parents[1]
TINY = """
dino: {head_n_prototypes: 64, head_bottleneck_dim: 16, head_hidden_dim: 32, mrl_l2_norm: true, koleo_loss_weight: 0.0}
ibot: {separate_head: true, head_n_prototypes: 64, head_bottleneck_dim: 16, head_hidden_dim: 32,
       mask_sample_probability: 0.5}
train: {dataset_path: "FashionMNIST:root=bundled:split=train", OFFICIAL_EPOCH_LENGTH: 3, num_workers: 0,
        log_period: 1, seed: 3}
student: {arch: vit_tiny, embed_dim: 32, depth: 2, num_heads: 2, patch_size: 4, drop_path_rate: 0.0,
          ffn_layer: swiglufused, block_chunks: 2}
teacher: {momentum_teacher: 0.9, warmup_teacher_temp_epochs: 1}
optim: {epochs: 3, warmup_epochs: 1, base_lr: 0.01, freeze_last_layer_epochs: 1}
crops: {global_crops_size: 16, local_crops_size: 8, local_crops_number: 2}
evaluation: {eval_period_iterations: 0}
"""
TERMS = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss", "lr", "mom")


def command(config: Path, out: Path, ranks: int, *overrides: str) -> list[str]:
    batch = f"train.batch_size_per_gpu={8 // ranks}"
    train = ["-m", "franca.train", "--config-file", str(config), "--output-dir", str(out), batch, *overrides]
    if ranks == 1:
        return [sys.executable, *train]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
    return [*launcher, "--master-port", str(free_port()), *train]


def run(config: Path, out: Path, ranks: int, *overrides: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command(config, out, ranks, *overrides), env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def metrics(out: Path) -> dict[int, dict]:
    lines = (out / "training_metrics.json").read_text().splitlines()
    return {record["iteration"]: record for record in map(json.loads, lines)}


def assert_same_losses(a: dict[int, dict], b: dict[int, dict], iterations) -> None:
    for iteration in iterations:
        for key in TERMS:
            assert a[iteration][key] == pytest.approx(b[iteration][key], rel=2e-4, abs=1e-5), (iteration, key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted 1-process and 2-process run of 9 iterations (checkpoints at 6 and 9 kept)."""
    root = tmp_path_factory.mktemp("dist")
    config = root / "tiny.yaml"
    config.write_text(TINY)
    paths = {"config": config, "one": root / "one", "two": root / "two"}
    run(config, paths["one"], 1)
    run(config, paths["two"], 2)
    return paths


@pytest.mark.slow
def test_two_ranks_give_the_single_process_losses_and_rank_zero_writes(runs):
    one, two = metrics(runs["one"]), metrics(runs["two"])
    assert sorted(one) == sorted(two) == list(range(9))
    assert_same_losses(one, two, range(9))
    assert sorted(p.name for p in (runs["two"] / "checkpoints").iterdir()) == ["dcp_0000006", "dcp_0000009"]
    dcp_dir = runs["two"] / "checkpoints" / "dcp_0000009"
    assert {"rng_rank0.pth", "rng_rank1.pth", "train_state.pth"} <= {p.name for p in dcp_dir.iterdir()}
    digests = read_record(dcp_dir).files  # every rank's files, hashed by the rank that wrote them
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(digests)
    assert sorted(digests) == sorted(p.name for p in dcp_dir.iterdir() if p.name != "record.json")
    assert (runs["two"] / "logs" / "log.rank1.txt").is_file()
    assert "Training [" not in (runs["two"] / "logs" / "log.rank1.txt").read_text()  # progress: rank 0 only
    a = torch.load(runs["one"] / "eval" / "training_9" / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    b = torch.load(runs["two"] / "eval" / "training_9" / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)


@pytest.mark.parametrize(("source", "ranks"), [("two", 1), ("one", 2)])
@pytest.mark.slow
def test_resume_at_another_world_size_continues_the_run(runs, tmp_path, source, ranks):
    out = tmp_path / "resumed"
    shutil.copytree(runs[source], out)
    for last in ("dcp_0000009", "model_0000009.pth"):
        path = out / "checkpoints" / last
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    run(runs["config"], out, ranks)
    resumed = metrics(out)
    assert sorted(resumed) == list(range(9))
    assert_same_losses(resumed, metrics(runs[source]), range(6, 9))


def test_consolidate_a_two_rank_checkpoint_matches_the_run_export(runs, tmp_path):
    assert consolidate_main([str(runs["two"]), str(tmp_path / "release")]) == 0
    exported = torch.load(runs["two"] / "eval" / "training_9" / "teacher_checkpoint.pth", weights_only=True)
    consolidated = torch.load(tmp_path / "release" / "teacher_checkpoint.pth", weights_only=True)
    assert exported["teacher"].keys() == consolidated["teacher"].keys()
    assert all(torch.equal(exported["teacher"][k], v) for k, v in consolidated["teacher"].items())
    assert consolidated["backbone_config"] == exported["backbone_config"]
    from_pth = load_backbone(tmp_path / "release" / "teacher_checkpoint.pth").state_dict()
    from_safetensors = load_backbone(tmp_path / "release" / "backbone").state_dict()
    assert all(torch.equal(from_pth[k], v) for k, v in from_safetensors.items())
    assert torch.equal(from_pth["blocks.1.attn.qkv.weight"], exported["teacher"]["backbone.blocks.1.1.attn.qkv.weight"])


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_all_ranks_with_one_checkpoint(runs, tmp_path):
    out = tmp_path / "stopped"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        command(runs["config"], out, 2, "optim.epochs=50"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while not (out / "training_metrics.json").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGTERM)  # one worker only: the other learns it through the stop all-reduce
    stdout, stderr = proc.communicate(timeout=120)
    assert "run the same command again to resume" in stdout.decode(), stderr.decode()[-3000:]
    saved = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(saved) == 1 and saved[0].startswith("dcp_"), saved
    last_logged = max(metrics(out))
    assert saved[0] == f"dcp_{last_logged + 1:07d}"
    dcp_dir = out / "checkpoints" / saved[0]
    assert {"rng_rank0.pth", "rng_rank1.pth"} <= {p.name for p in dcp_dir.iterdir()}
