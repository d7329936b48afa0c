"""Adapting a pretrained backbone (training.md, "Adapt a backbone to your images"): the architecture read off any kind
of weights file, the heads-first stage, gradient accumulation and the drift monitor."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import TINY_HEADS, TINY_STEP, free_port, student_gradients, with_mask_lists
from omegaconf import OmegaConf

from franca.checkpoint.release import save_teacher_release
from franca.models import build_vit
from franca.models.safetensors_folder import export_safetensors
from franca.train import train as trainer
from franca.train.config import TRAINING_SCHEMA, load_config
from franca.train.drift import DriftMonitor, probe_features
from franca.train.pretrained import load_pretrained, resolve_pretrained
from franca.train.runtime import Runtime
from franca.train.schedules import BackboneStages
from franca.train.ssl_meta_arch import SSLMetaArch
from franca.utils.config_schema import ConfigError

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "train" / "adapt.yaml"
# A pretrained backbone of another shape than the defaults: 64-d (1 head: the only count a file without a config
# can be read with), 2 blocks, patch 4, native 16 px, SwiGLU, LayerScale.
SOURCE = {"embed_dim": 64, "depth": 2, "num_heads": 1, "patch_size": 4, "img_size": 16, "ffn_layer": "swiglufused"}
# Small heads and a short run on the shipped Fashion-MNIST subset; no architecture key.
TINY_ADAPT = [
    "train.dataset_path=FashionMNIST:root=bundled:split=train",
    "train.batch_size_per_gpu=8",
    "train.OFFICIAL_EPOCH_LENGTH=3",
    "train.num_workers=0",
    "train.log_period=1",
    "train.drift_probe_images=8",
    "optim.epochs=3",
    "optim.warmup_epochs=1",
    "optim.backbone_warmup_iterations=2",
    "train.freeze_backbone_iterations=3",
    "crops.local_crops_number=2",
    *TINY_HEADS,
]


def _source_backbone():
    torch.manual_seed(0)
    return build_vit("vit_tiny", **SOURCE)


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory) -> dict[str, Path]:
    """The same backbone in each kind of file ``student.pretrained_weights`` reads (with heads where the kind has
    them)."""
    root = tmp_path_factory.mktemp("weights")
    backbone = _source_backbone()
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    heads = {"dino_head.mlp.0.weight": torch.randn(32, 64), "ibot_head.mlp.0.weight": torch.randn(32, 64)}
    files = {
        "release": save_teacher_release(state, backbone.build_config(), root / "release.pth", block_chunks=2),
        "teacher export": save_teacher_release({**state, **heads}, backbone.build_config(), root / "teacher.pth", 0),
        "safetensors folder": export_safetensors(backbone, root / "folder"),
    }
    checkpoint = {f"{who}.{k}": v for who in ("student", "teacher") for k, v in state.items()}
    torch.save({"model": checkpoint, "iteration": 3, "optimizer": {}}, root / "model_0000003.pth")
    files["training checkpoint (no stored config)"] = root / "model_0000003.pth"
    two_heads = {**backbone.build_config(), "num_heads": 2}  # not guessable from the shapes: read from the file
    torch.save({"model": checkpoint, "iteration": 3, "backbone_config": two_heads}, root / "model_0000006.pth")
    files["training checkpoint"] = root / "model_0000006.pth"
    return files


def _resolved(overrides: list[str], config_file: Path | None = RECIPE):
    cfg = load_config(config_file, overrides)
    return cfg, resolve_pretrained(cfg, TRAINING_SCHEMA.explicit_keys(config_file, overrides))


def test_missing_pretrained_weights_are_named_by_their_config_key(tmp_path):
    missing = tmp_path / "missing.pth"
    with pytest.raises(FileNotFoundError, match=f"student.pretrained_weights='{missing}': no such file"):
        _resolved([*TINY_ADAPT, f"student.pretrained_weights={missing}"])


@pytest.mark.slow
def test_the_command_line_prints_a_user_error_as_one_line(tmp_path):
    command = [sys.executable, "-m", "franca.train", "--config-file", str(RECIPE), "--output-dir", str(tmp_path)]
    done = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: train.freeze_backbone_iterations=30") and "Traceback" not in done.stderr


def test_a_missing_image_folder_is_named_by_its_config_key(weight_files, tmp_path):
    argv = _tiny_run(tmp_path / "run", weight_files["release"])
    with pytest.raises(FileNotFoundError, match="train.dataset_path='ImageFolder:root=/no/such/images'"):
        trainer.main([*argv, "train.dataset_path=ImageFolder:root=/no/such/images"])


@pytest.mark.parametrize(
    "kind", ["release", "teacher export", "safetensors folder", "training checkpoint (no stored config)"]
)
def test_the_architecture_and_crop_sizes_are_read_off_each_kind_of_file(weight_files, kind):
    cfg, weights = _resolved([*TINY_ADAPT, f"student.pretrained_weights={weight_files[kind]}"])
    student = cfg.student
    assert (student.embed_dim, student.depth, student.num_heads, student.patch_size) == (64, 2, 1, 4)
    assert (student.ffn_layer in ("swiglu", "swiglufused"), student.mlp_ratio) == (True, 4.0)
    assert cfg.crops.global_crops_size == 16  # the native size
    assert cfg.crops.local_crops_size == 8  # 96/224 of it, rounded to the patch: round(16 * 0.43 / 4) * 4
    model = SSLMetaArch(cfg)
    load_pretrained(cfg, model, weights)
    source = _source_backbone().state_dict()
    own = model.teacher["backbone"].state_dict()
    assert all(torch.equal(own[k], v) for k, v in source.items())


def test_the_head_count_of_a_training_checkpoint_comes_from_its_stored_backbone_config(weight_files):
    cfg, _ = _resolved([*TINY_ADAPT, f"student.pretrained_weights={weight_files['training checkpoint']}"])
    assert (cfg.student.embed_dim, cfg.student.num_heads) == (64, 2)


def test_a_config_value_that_contradicts_the_file_names_both(weight_files):
    with pytest.raises(ConfigError) as error:
        _resolved([*TINY_ADAPT, f"student.pretrained_weights={weight_files['release']}", "student.patch_size=8"])
    assert "student.patch_size=8" in str(error.value) and "the file has 4" in str(error.value)
    with pytest.raises(ConfigError, match=r"student.arch/embed_dim/depth/num_heads=\(192, 12, 3\).*\(64, 2, 1\)"):
        _resolved([*TINY_ADAPT, f"student.pretrained_weights={weight_files['release']}", "student.arch=vit_tiny"])


def test_values_set_to_what_the_file_has_are_accepted_and_a_larger_crop_resizes_the_grid(weight_files):
    source = f"student.pretrained_weights={weight_files['release']}"
    cfg, _ = _resolved([*TINY_ADAPT, source, "student.patch_size=4", "crops.global_crops_size=24"])
    assert (cfg.crops.global_crops_size, cfg.crops.local_crops_size) == (24, 12)


def test_the_heads_of_a_teacher_export_start_the_heads_when_they_fit(weight_files, capsys):
    source = f"student.pretrained_weights={weight_files['teacher export']}"
    cfg, weights = _resolved([*TINY_ADAPT, source, "student.pretrained_heads=true"])
    assert set(weights.heads) == {"dino_head", "ibot_head"}
    model = SSLMetaArch(cfg)
    with pytest.raises(ConfigError, match="student.pretrained_heads=true, but the file's dino_head, ibot_head have"):
        load_pretrained(cfg, model, weights)  # the file's stand-in heads are not the configured MLPs
    cfg.student.pretrained_heads = "auto"
    load_pretrained(cfg, model, weights)
    assert "heads are fresh: the file's dino_head, ibot_head have other shapes" in capsys.readouterr().out


def _tiny_run(out: Path, weights: Path) -> list[str]:
    return [
        "--output-dir",
        str(out),
        "--config-file",
        str(RECIPE),
        *TINY_ADAPT,
        f"student.pretrained_weights={weights}",
    ]


@pytest.mark.slow
def test_stage_one_changes_no_backbone_parameter_and_trains_the_heads(weight_files, tmp_path):
    out = tmp_path / "stage1"
    argv = _tiny_run(out, weight_files["release"])
    trainer.main([*argv, "train.freeze_backbone_iterations=4", "train.stop_at_iteration=3"])
    saved = torch.load(out / "checkpoints" / "model_0000003.pth", weights_only=True)
    source = _source_backbone().state_dict()
    for who in ("student", "teacher"):
        assert all(torch.equal(saved["model"][f"{who}.backbone.{k}"], v) for k, v in source.items()), who
    trained = saved["optimizer"]["state"].keys()  # parameters with optimizer moments: those that had gradients
    assert any(".dino_head." in name for name in trained) and not any(".backbone." in name for name in trained)
    records = [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]
    assert [r["drift_cls_cos"] for r in records] == [1.0, 1.0, 1.0]  # the teacher backbone did not move


def test_backbone_lr_scale_is_zero_in_stage_one_then_ramps():
    stages = BackboneStages(freeze_iters=3, warmup_iters=4, lr_mult=0.1)
    assert [stages[i] for i in range(9)] == pytest.approx([0, 0, 0, 0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    plain = BackboneStages(0, 0, 1.0)
    assert all(plain[i] == 1.0 for i in range(5))


@pytest.mark.slow
def test_the_stage_boundary_survives_sigkill_and_resumes_exactly(weight_files, tmp_path):
    stages = ["train.freeze_backbone_iterations=4", "evaluation.eval_period_iterations=0"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    full = tmp_path / "full"
    run = [sys.executable, "-m", "franca.train", *_tiny_run(full, weight_files["release"]), *stages]
    subprocess.run(run, env=env, check=True, stdout=subprocess.DEVNULL)  # the same process setup as the killed run
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "franca.train", *_tiny_run(killed, weight_files["release"]), *stages]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = killed / "checkpoints" / "model_0000003.pth"  # in stage 1; the run crosses the boundary after resuming
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), proc.stderr.read().decode()[-2000:]
    assert not (killed / "eval" / "training_9").exists(), "the run finished before it could be killed"
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    a = torch.load(full / "eval" / "training_9" / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    b = torch.load(killed / "eval" / "training_9" / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [(full / "training_metrics.json"), (killed / "training_metrics.json")]
    losses = [[json.loads(line)["total_loss"] for line in path.read_text().splitlines()] for path in lines]
    assert losses[0] == losses[1]


# ---------------------------------------------------------------------------------------------------------------------
# Gradient accumulation: k micro-batches give the gradients of one step on their concatenation.

IMAGES, MICRO = 16, 4
STEP_CONFIG = [*TINY_STEP, "dino.head_n_prototypes=64", "ibot.head_n_prototypes=64"]


def _big_batch(seed: int = 0) -> dict:
    """A collated batch of IMAGES images (rows crop-major: crop c of image b is row c·IMAGES + b) with random masks."""
    generator = torch.Generator().manual_seed(seed)
    masks = torch.rand(2 * IMAGES, 16, generator=generator) < 0.3
    masks[1::3] = False  # some crops without masks
    batch = {
        "collated_global_crops": torch.randn(2 * IMAGES, 3, 16, 16, generator=generator),
        "collated_local_crops": torch.randn(2 * IMAGES, 3, 8, 8, generator=generator),
        "collated_masks": masks,
    }
    return with_mask_lists(batch)


def _images(batch: dict, images: list[int]) -> dict:
    """The sub-batch of ``images`` (every crop of each), collated anew: crop-major rows and its own mask lists."""
    rows = [c * IMAGES + b for c in range(2) for b in images]
    return with_mask_lists(
        {key: batch[key][rows] for key in ("collated_global_crops", "collated_local_crops", "collated_masks")}
    )


def _step(model: SSLMetaArch, batches, runtime: Runtime) -> dict:
    model.student.zero_grad(set_to_none=True)
    return model.forward_backward(batches, 0.05, runtime)


@pytest.mark.slow
def test_accumulated_micro_batches_equal_one_large_step():
    cfg = load_config(None, STEP_CONFIG)
    torch.manual_seed(0)
    big = SSLMetaArch(cfg)
    accumulated = SSLMetaArch(cfg)
    accumulated.load_state_dict(big.state_dict())
    runtime = Runtime.resolve(cfg, torch.device("cpu"))
    batch = _big_batch()
    micro = [_images(batch, list(range(j, IMAGES, MICRO))) for j in range(MICRO)]  # any split of the images
    expected = _step(big, batch, runtime)
    got = _step(accumulated, micro, runtime)
    assert got.keys() == expected.keys() == {"dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss"}
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    grads, reference = student_gradients(accumulated), student_gradients(big)
    assert grads.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-4, atol=1e-7, msg=name)


def _accumulation_worker(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    from franca.train.parallel import parallelize

    torch.set_num_threads(1)
    cfg = load_config(None, [*STEP_CONFIG, "compute_precision.distributed=fsdp"])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = SSLMetaArch(cfg)
        runtime = Runtime.resolve(cfg, torch.device("cpu"), world_size=2)
        parallelize(model, cfg, runtime, world_size=2)
        batch = _big_batch()
        half = list(range(rank * IMAGES // 2, (rank + 1) * IMAGES // 2))
        micro = [_images(batch, half[j::MICRO]) for j in range(MICRO)]
        losses = _step(model, micro, runtime)
        mean = {k: v.clone() for k, v in losses.items()}
        for value in mean.values():
            dist.all_reduce(value)
            value /= 2
        grads = {}
        for name, p in model.student.named_parameters():
            if p.grad is not None:
                grads[name] = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        if rank == 0:
            # numpy arrays travel by value (tensors would be shared memory, gone when this process exits)
            results.put(({k: float(v) for k, v in mean.items()}, {k: v.numpy() for k, v in grads.items()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_accumulation_on_two_ranks_equals_one_large_step_in_one_process():
    cfg = load_config(None, STEP_CONFIG)
    torch.manual_seed(0)
    big = SSLMetaArch(cfg)
    expected = _step(big, _big_batch(), Runtime.resolve(cfg, torch.device("cpu")))
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_accumulation_worker, args=(r, port, results)) for r in range(2)]
    for process in processes:
        process.start()
    losses, grads = results.get(timeout=120)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    for key, value in expected.items():
        assert losses[key] == pytest.approx(float(value), rel=1e-5)
    reference = student_gradients(big)
    for name in reference:
        torch.testing.assert_close(torch.from_numpy(grads[name]), reference[name], rtol=1e-4, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------------------------------
# Drift monitor


def test_drift_is_the_mean_cosine_of_cls_and_mean_patch_features_in_float64():
    backbone = _source_backbone().eval()
    images = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    monitor = DriftMonitor(images, probe_features(backbone, images, None), None, 0, 0.2, 10)
    assert monitor.measure(backbone) == pytest.approx({"drift_cls_cos": 1.0, "drift_patch_cos": 1.0}, abs=1e-6)
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    got = monitor.measure(backbone)

    reference = _source_backbone().double().eval()
    moved = backbone.double()
    with torch.no_grad():
        before, after = reference.forward_features(images.double()), moved.forward_features(images.double())
    expected = {
        "drift_cls_cos": F.cosine_similarity(before["x_norm_clstoken"], after["x_norm_clstoken"]).mean().item(),
        "drift_patch_cos": F.cosine_similarity(
            before["x_norm_patchtokens"].mean(1), after["x_norm_patchtokens"].mean(1)
        )
        .mean()
        .item(),
    }
    assert got == pytest.approx(expected, abs=1e-5)
    assert got["drift_cls_cos"] < 0.999


def test_drift_warns_once_when_the_cls_cosine_falls_fast_after_the_backbone_joins():
    monitor = DriftMonitor(torch.zeros(1), {}, None, backbone_start=10, drop=0.2, window=20)
    assert monitor.update({"drift_cls_cos": 0.5}, 5) == []  # stage 1: not judged
    assert monitor.update({"drift_cls_cos": 0.9}, 12) == []
    (warning,) = monitor.update({"drift_cls_cos": 0.7}, 15)
    assert "fell by 0.30" in warning and "optim.backbone_lr_mult" in warning and "freeze_backbone" in warning
    assert monitor.update({"drift_cls_cos": 0.1}, 16) == []  # once
    late = DriftMonitor(torch.zeros(1), {}, None, backbone_start=10, drop=0.2, window=20)
    assert late.update({"drift_cls_cos": 0.5}, 30) == []  # slow drift after the window is adaptation, not collapse


@pytest.mark.slow
def test_a_released_vitb14_file_adapts_with_the_large_recipe_one_iteration_per_stage(tmp_path, capsys):
    """The released-weights path at ViT-B/14 (random weights in the release layout: chunked keys, no config), the
    IN21K recipe, 224 → 112 px, one iteration of each stage; the console names both stages."""
    from franca.hub import franca_vitb14
    from franca.models.weights import to_release

    torch.manual_seed(0)
    release = tmp_path / "franca_vitb14_random.pth"
    torch.save({"teacher": to_release(franca_vitb14(pretrained=False).state_dict(), block_chunks=4)}, release)
    out = tmp_path / "run"
    argv = ["--config-file", str(REPO / "configs" / "train" / "IN21K" / "vitb14.yaml"), "--output-dir", str(out)]
    trainer.main(
        [
            *argv,
            f"student.pretrained_weights={release}",
            "train.dataset_path=FashionMNIST:root=bundled:split=train",
            "train.batch_size_per_gpu=2",
            "train.num_workers=0",
            "train.OFFICIAL_EPOCH_LENGTH=2",
            "train.log_period=1",
            "train.freeze_backbone_iterations=1",
            "train.drift_probe_images=4",
            "optim.epochs=1",
            "optim.warmup_epochs=0",
            "crops.global_crops_size=112",
            "crops.local_crops_size=56",
            "crops.local_crops_number=2",
            "dino.head_n_prototypes=1024",
            "ibot.head_n_prototypes=1024",
        ]
    )
    console = capsys.readouterr().out
    assert "stage 1: heads only for 1 iterations" in console and "stage 2 from iteration 2" in console
    records = [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1]
    assert records[0]["drift_cls_cos"] == 1.0 and all(math.isfinite(r["total_loss"]) for r in records)
    config = torch.load(out / "eval" / "training_2" / "teacher_checkpoint.pth", weights_only=True)["backbone_config"]
    assert (config["arch"], config["img_size"], config["patch_size"]) == ("vit_base", 112, 14)


@pytest.mark.slow
def test_a_dinov3_folder_adapts_too_rope_read_off_the_folder(tmp_path):
    """A transformers DINOv3 folder (RoPE, 4 storage tokens, patch 16; random weights) as student.pretrained_weights:
    the RoPE settings come from the folder, and both stages train."""
    transformers = pytest.importorskip("transformers")
    from interop_helpers import randomise_

    config = transformers.DINOv3ViTConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=1,
        intermediate_size=256,
        num_register_tokens=4,
        image_size=32,
        patch_size=16,
    )
    randomise_(transformers.DINOv3ViTModel(config)).save_pretrained(tmp_path / "dinov3")
    out = tmp_path / "run"
    stages = ["train.freeze_backbone_iterations=1", "optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=2"]
    trainer.main([*_tiny_run(out, tmp_path / "dinov3"), *stages, "optim.backbone_warmup_iterations=0"])
    saved = OmegaConf.load(out / "config.yaml")
    assert (saved.student.position_encoding, saved.student.patch_size, saved.student.num_register_tokens) == (
        "rope",
        16,
        4,
    )
    assert saved.student.layer_norm_eps == pytest.approx(1e-5)
    records = [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1] and all(math.isfinite(r["total_loss"]) for r in records)
