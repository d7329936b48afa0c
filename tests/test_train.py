"""End-to-end tests of the single-process trainer on real Fashion-MNIST photos (the shipped subset)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_RUN

from franca.data.batched_augmentations import apply_photometric_to_batch
from franca.hub import load_backbone
from franca.train import build
from franca.train import train as trainer
from franca.train.nonfinite import NonFiniteLossError
from franca.train.pretrained import load_pretrained
from franca.utils.config_schema import ConfigError

REPO = Path(__file__).resolve().parents[1]
HEALTH_KINDS = ("target_entropy", "student_entropy", "prototypes_used")


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]


class ReferenceRuns:
    """The uninterrupted tiny runs that several tests read (never write), each trained on first use: ``per_image``
    and ``batched`` (``crops.batched_photometric=true``). :attr:`batched_steps` lists the iterations whose batch the
    batched run finished with :func:`apply_photometric_to_batch` (uint8 crops checked on the way)."""

    def __init__(self, root: Path):
        self.root = root
        self.config = root / "tiny.yaml"
        self.config.write_text(TINY_RUN)
        self.batched_steps: list[int] = []
        self._finished: set[str] = set()

    def output(self, name: str) -> Path:
        out = self.root / name
        if name not in self._finished:
            if out.exists():
                pytest.fail(f"the reference run {name!r} failed in an earlier test; see that failure")
            argv = ["--config-file", str(self.config), "--output-dir", str(out)]
            if name == "per_image":
                trainer.main(argv)
            else:
                with pytest.MonkeyPatch.context() as patch:
                    patch.setattr(build, "apply_photometric_to_batch", self._spy)
                    trainer.main([*argv, "crops.batched_photometric=true"])
            self._finished.add(name)
        return out

    def _spy(self, batch: dict) -> dict:
        assert batch["collated_global_crops"].dtype == torch.uint8
        self.batched_steps.append(batch["iteration"])
        return apply_photometric_to_batch(batch)


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory) -> ReferenceRuns:
    return ReferenceRuns(tmp_path_factory.mktemp("reference_runs"))


@pytest.mark.slow
def test_tiny_run_writes_metrics_checkpoints_and_a_loadable_teacher(reference_runs):
    out = reference_runs.output("per_image")
    records = read_metrics(out)
    assert [r["iteration"] for r in records] == list(range(9))
    terms = ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss")
    for r in records:
        assert abs(r["total_loss"] - sum(r[k] for k in terms)) < 1e-4
        assert {"lr", "wd", "mom", "teacher_temp", "iter_time"} <= set(r)
        health = [f"{h}_{kind}_l{level}" for h in ("dino", "ibot") for kind in HEALTH_KINDS for level in range(5)]
        assert all(0.0 <= r[k] <= 1.0 + 1e-5 for k in [*health, "teacher_cls_spread"])
    assert records[0]["lr"] == 0.0 and records[0]["teacher_temp"] == pytest.approx(0.04)
    assert (out / "config.yaml").is_file() and (out / "loss_curves.png").is_file()
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("model_*.pth"))
    assert checkpoints == ["model_0000006.pth", "model_0000009.pth"]  # every epoch, the last 2 kept

    for done in (6, 9):  # periodic (eval_period_iterations=6) and final exports, named like the checkpoints
        export = out / "eval" / f"training_{done}" / "teacher_checkpoint.pth"
        raw = torch.load(export, weights_only=True)
        keys = raw["teacher"].keys()
        assert "backbone.blocks.1.1.attn.qkv.weight" in keys  # released chunked naming, 2 chunks of 1 block
        assert any(k.startswith("dino_head.last_layers.4.") for k in keys)
        assert any(k.startswith("ibot_head.") for k in keys)
    model = load_backbone(export).eval()
    assert model.num_heads == 2 and model.embed_dim == 32
    state = torch.load(out / "checkpoints" / "model_0000009.pth", weights_only=True)["model"]
    teacher = {k[len("teacher.backbone.") :]: v for k, v in state.items() if k.startswith("teacher.backbone.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in teacher.items())


@pytest.mark.parametrize("overrides", [[], ["crops.batched_photometric=true"]], ids=["per_image", "batched"])
@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(tiny_config, tmp_path, overrides, reference_runs):
    full = reference_runs.output("batched" if overrides else "per_image")
    reference = {r["iteration"]: r for r in read_metrics(full)}

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "franca.train", "--config-file", str(tiny_config), "--output-dir", str(killed)]
    command += overrides
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_checkpoint = killed / "checkpoints" / "model_0000003.pth"
    deadline = time.monotonic() + 120
    while not first_checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first_checkpoint.exists(), proc.stderr.read().decode()[-2000:]
    assert not (killed / "eval" / "training_9").exists(), "the run finished before it could be killed"

    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    resumed = {r["iteration"]: r for r in read_metrics(killed)}
    assert sorted(resumed) == sorted(reference)
    for iteration, record in reference.items():
        for key in ("total_loss", "dino_local_crops_loss", "ibot_loss", "koleo_loss", "lr", "mom"):
            assert resumed[iteration][key] == pytest.approx(record[key], rel=1e-6, abs=1e-7), (iteration, key)
    a = torch.load(full / "eval" / "training_9" / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    b = torch.load(killed / "eval" / "training_9" / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_stop_at_iteration_checkpoints_and_the_next_run_continues_the_same_schedule(reference_runs, tmp_path, capsys):
    reference = {r["iteration"]: r for r in read_metrics(reference_runs.output("per_image"))}
    out = tmp_path / "run"
    argv = ["--config-file", str(reference_runs.config), "--output-dir", str(out)]
    trainer.main([*argv, "train.stop_at_iteration=4"])
    assert [r["iteration"] for r in read_metrics(out)] == [0, 1, 2, 3]
    assert (out / "checkpoints" / "model_0000004.pth").is_file()
    assert not (out / "eval" / "training_9").exists()

    trainer.main([*argv, "train.stop_at_iteration=4"])  # already there: nothing to do, nothing written
    assert [r["iteration"] for r in read_metrics(out)] == [0, 1, 2, 3]
    trainer.main(argv)
    resumed = {r["iteration"]: r for r in read_metrics(out)}
    assert sorted(resumed) == sorted(reference)
    for iteration, record in reference.items():
        for key in ("total_loss", "koleo_loss", "ibot_loss", "lr", "teacher_temp"):
            assert resumed[iteration][key] == pytest.approx(record[key], rel=1e-6, abs=1e-7), (iteration, key)

    export = out / "eval" / "training_9" / "teacher_checkpoint.pth"
    written = export.stat().st_mtime_ns
    assert trainer.main(argv) == {}  # complete: says so, and neither trains nor exports again
    assert export.stat().st_mtime_ns == written and sorted(resumed) == [r["iteration"] for r in read_metrics(out)]
    assert "is complete (9/9 iterations) and its teacher is exported" in capsys.readouterr().out


@pytest.mark.slow
def test_sigterm_checkpoints_and_stops(tiny_config, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "franca.train", "--config-file", str(tiny_config), "--output-dir", str(out)]
    proc = subprocess.Popen(
        command + ["optim.epochs=50"], env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while not (out / "training_metrics.json").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "run the same command again to resume" in stdout.decode()
    saved = torch.load(
        out / "checkpoints" / f"model_{read_metrics(out)[-1]['iteration'] + 1:07d}.pth", weights_only=True
    )
    assert saved["iteration"] == read_metrics(out)[-1]["iteration"] + 1


@pytest.mark.slow
def test_batched_photometric_runs_on_the_device_side_with_finite_losses(reference_runs):
    """crops.batched_photometric=true on CPU: the loader yields uint8 crops with parameters, every step finishes them
    with the batched ops, and training gives finite losses."""
    records = read_metrics(reference_runs.output("batched"))
    finished = reference_runs.batched_steps
    assert finished == list(range(9)) and [r["iteration"] for r in records] == finished
    assert all(math.isfinite(r[k]) for r in records for k in ("total_loss", "ibot_loss", "koleo_loss"))


@pytest.mark.slow
def test_dinov2_baseline_and_softmax_centering_train(tiny_config, tmp_path):
    out = tmp_path / "baseline"
    overrides = ["dino.MRL=false", "train.centering=centering", "optim.epochs=1", "train.use_inverse_block=false"]
    record = trainer.main(["--config-file", str(tiny_config), "--output-dir", str(out), *overrides])
    assert torch.isfinite(torch.tensor(record["total_loss"]))
    keys = torch.load(out / "eval" / "training_3" / "teacher_checkpoint.pth", weights_only=True)["teacher"].keys()
    assert "dino_head.last_layer.weight_g" in keys and not any("last_layers" in k for k in keys)


@pytest.mark.slow
def test_pretrained_weights_initialise_both_backbones(tiny_config, tmp_path):
    first = tmp_path / "first"
    trainer.main(["--config-file", str(tiny_config), "--output-dir", str(first), "optim.epochs=1"])
    export = first / "eval" / "training_3" / "teacher_checkpoint.pth"
    cfg_args = ["--config-file", str(tiny_config), "--output-dir", str(tmp_path / "second")]
    args = trainer.get_args_parser().parse_args(cfg_args + [f"student.pretrained_weights={export}"])
    cfg, pretrained = trainer.setup_run(args)
    from franca.train.ssl_meta_arch import SSLMetaArch

    model = SSLMetaArch(cfg)
    load_pretrained(cfg, model, pretrained)
    source = load_backbone(export).state_dict()
    exported = torch.load(export, weights_only=True)["teacher"]
    for name in ("student", "teacher"):
        own = model.__getattr__(name)["backbone"].state_dict()
        assert all(torch.equal(own[k], v) for k, v in source.items())
        for head in ("dino_head", "ibot_head"):  # the export carries the teacher's heads: both runs start from them
            own_head = model.__getattr__(name)[head].state_dict()
            assert all(torch.equal(v, exported[f"{head}.{k}"]) for k, v in own_head.items())


def test_config_and_dataset_errors_are_clear(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="optim.base_lrr"):
        trainer.main(["--config-file", str(tiny_config), "--output-dir", str(tmp_path / "a"), "optim.base_lrr=1"])
    missing = "train.dataset_path=ImageFolder:root=/nonexistent/photos"
    with pytest.raises(FileNotFoundError, match="/nonexistent/photos"):
        trainer.main(["--config-file", str(tiny_config), "--output-dir", str(tmp_path / "b"), missing])


def test_nonfinite_loss_stops_with_the_term_name(tiny_config, tmp_path, monkeypatch):
    from franca.train.ssl_meta_arch import SSLMetaArch

    original = SSLMetaArch.assemble_losses

    def poisoned(self, *args, **kwargs):
        losses = original(self, *args, **kwargs)
        losses["koleo_loss"] = losses["koleo_loss"] * float("nan")
        return losses

    monkeypatch.setattr(SSLMetaArch, "assemble_losses", poisoned)
    with pytest.raises(NonFiniteLossError, match="koleo_loss"):
        trainer.main(["--config-file", str(tiny_config), "--output-dir", str(tmp_path / "nan")])


@pytest.mark.slow
def test_nonfinite_loss_between_log_steps_is_caught_before_the_next_checkpoint(tiny_config, tmp_path, monkeypatch):
    from franca.train.ssl_meta_arch import SSLMetaArch

    original, calls = SSLMetaArch.assemble_losses, []

    def poisoned_once(self, *args, **kwargs):
        losses = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 5:  # iteration 4: between the log steps 0 and 5 (log_period=5), before checkpoint 6
            losses["ibot_loss"] = losses["ibot_loss"] * float("inf")
        return losses

    monkeypatch.setattr(SSLMetaArch, "assemble_losses", poisoned_once)
    out = tmp_path / "inf"
    with pytest.raises(NonFiniteLossError, match=r"ibot_loss.*since iteration 4") as info:
        trainer.main(["--config-file", str(tiny_config), "--output-dir", str(out), "train.log_period=5"])
    assert sorted(p.name for p in (out / "checkpoints").glob("model_*.pth")) == ["model_0000003.pth"]
    checkpoint = out / "checkpoints" / "model_0000003.pth"
    assert f"integrity check and was followed by finite steps is {checkpoint}" in str(info.value)


@pytest.mark.slow
def test_quickstart_runs_end_to_end_in_short_form(tmp_path, capsys):
    from franca import quickstart

    record = quickstart.main(
        [
            "--output-dir",
            str(tmp_path / "qs"),
            "--knn-train-samples",
            "400",
            "--knn-test-samples",
            "100",
            "train.dataset_path=FashionMNIST:root=bundled:split=train",
            "train.num_workers=0",
            "train.batch_size_per_gpu=16",
            "train.OFFICIAL_EPOCH_LENGTH=2",
            "optim.epochs=2",
            "optim.warmup_epochs=1",
            "--test-dataset",
            "FashionMNIST:root=bundled:split=test",
        ]
    )
    assert set(record["knn"]) == {
        "raw pixels",
        "random-init ViT, CLS",
        "random-init ViT, mean patch",
        "Franca, CLS",
        "Franca, mean patch",
    }
    for by_k in record["knn"].values():
        assert 0 <= by_k["20"]["top1"] <= 100
    assert record["knn"]["raw pixels"]["20"]["top1"] > 50  # real photos: raw-pixel k-NN is far above chance
    assert "k-NN (k=20)" in capsys.readouterr().out


@pytest.mark.parametrize("batched", ["false", "true"])
@pytest.mark.slow
def test_training_on_webdataset_shards(tiny_config, tmp_path, batched):
    import io
    import tarfile

    import numpy as np
    from PIL import Image
    from skimage import data

    photo = Image.fromarray(data.astronaut())
    rng = np.random.default_rng(0)
    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard:02d}.tar", "w") as tar:
            for i in range(12):
                left, top = (int(v) for v in rng.integers(0, 400, size=2))
                buffer = io.BytesIO()
                photo.crop((left, top, left + 96, top + 96)).save(buffer, format="JPEG")
                info = tarfile.TarInfo(f"{shard:02d}{i:04d}.jpg")
                info.size = buffer.tell()
                buffer.seek(0)
                tar.addfile(info, buffer)
    dataset = f"train.dataset_path=WebDataset:urls={tmp_path}/shard-{{00..01}}.tar"
    out = tmp_path / "wds"
    overrides = [dataset, "optim.epochs=1", f"crops.batched_photometric={batched}"]
    record = trainer.main(["--config-file", str(tiny_config), "--output-dir", str(out), *overrides])
    assert record["iteration"] == 2 and torch.isfinite(torch.tensor(record["total_loss"]))
