"""Distillation (``python -m franca.distill``, training.md "Distil"): each mode's loss in float64 against formulas
written here, the frozen teacher, the config, the student export, resume after SIGKILL and a learning run.

The references below are transcriptions, with explicit loops, of what each mode computes:

- with heads (DINOv2/v3 distillation): the teacher's per-level Sinkhorn-Knopp targets (the original three-iteration
  loop of ``sinkhorn_knopp_teacher``) of its global-crop CLS tokens and of its masked patch tokens; the student's DINO
  cross-entropy of every local crop against both teacher views and of each global crop against the other view,
  divided by the 2 + 2L pairs; iBOT on the masked tokens weighted by 1 / masked tokens of their image, over 2B; KoLeo;
- head-free: the student's CLS and patch tokens through the linear projection against the teacher's, centred by the
  running mean (the first step's mean after one step), as 1 − cos, smooth-L1 to the row-standardised targets, or
  KL(teacher ‖ student) of the softmax similarities to [batch; queue]; crop sizes weighted by their crop counts.
"""

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from helpers import IMAGES, TINY_STEP, make_batch, step_losses, with_mask_lists
from omegaconf import OmegaConf

from franca.checkpoint import save_teacher_release
from franca.distill import __main__ as distill
from franca.distill.teacher import load_teacher
from franca.hub import franca_from_checkpoint
from franca.models.timm_backbone import TimmBackbone
from franca.train.build import build_model, build_train_step
from franca.train.config import apply_scaling_rules, load_config
from franca.train.distill_config import load_distill_config
from franca.train.distill_meta_arch import build_distill_meta_arch, choose_mode
from franca.train.runtime import Runtime
from franca.train.ssl_meta_arch import SSLMetaArch
from franca.utils.config_schema import ConfigError

REPO = Path(__file__).resolve().parents[1]
STUDENT_TEMP, TEACHER_TEMP, EPS = 0.1, 0.07, 1e-8
# A student of half the tiny teacher's width (helpers.TINY_STEP: 32-d, depth 2, patch 4, 16 px crops, 2 local crops).
STUDENT = [
    "student.embed_dim=16",
    "student.depth=1",
    "student.num_heads=2",
    "student.block_chunks=0",
    "teacher.warmup_teacher_temp_epochs=0",
    f"teacher.teacher_temp={TEACHER_TEMP}",
    "dino.koleo_loss_weight=0.1",
]


def save_teacher(folder: Path, seed: int = 0) -> Path:
    """A random tiny Franca teacher with heads, written as a run's teacher export with the run's config.yaml."""
    cfg = load_config(None, [*TINY_STEP, "dino.mrl_l2_norm=true"])
    torch.manual_seed(seed)
    model = SSLMetaArch(cfg)
    with torch.no_grad():  # blocks that are not muted (LayerScale 1e-5 at init) give each image its own features
        for name, p in model.teacher.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(0.5)
    path = folder / "eval" / "training_1" / "teacher_checkpoint.pth"
    path.parent.mkdir(parents=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return save_teacher_release(model.teacher.state_dict(), model.teacher["backbone"].build_config(), path, 0)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("teacher_run"))


def distill_config(teacher_file: Path, *overrides: str):
    return load_distill_config(None, [*TINY_STEP, *STUDENT, f"teacher.weights={teacher_file}", *overrides])


def float64_model(cfg, mode: str):
    teacher = load_teacher(cfg)
    torch.manual_seed(1)
    return build_distill_meta_arch(cfg, teacher, mode).double().train()


def float64_batch() -> dict:
    batch = with_mask_lists(make_batch(torch.Generator().manual_seed(2)))
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------------------------
# References


def sinkhorn_reference(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The original three iterations: Q = exp(l / τ)ᵀ normalised; rows / K, columns / B; returned as B rows."""
    q = torch.exp(logits / temperature).T
    q = q / q.sum()
    n_prototypes, n_samples = q.shape
    for _ in range(3):
        q = q / q.sum(dim=1, keepdim=True) / n_prototypes
        q = q / q.sum(dim=0, keepdim=True) / n_samples
    return (q * n_samples).T


def cross_entropy(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return -(target * torch.log_softmax(logits / STUDENT_TEMP, dim=-1)).sum(dim=-1)


def koleo_reference(features: torch.Tensor) -> torch.Tensor:
    unit = features / features.norm(dim=-1, keepdim=True).clamp_min(EPS)
    logs = []
    for i in range(unit.shape[0]):
        nearest = max(
            (j for j in range(unit.shape[0]) if j != i), key=lambda j: float(unit[i].detach() @ unit[j].detach())
        )
        logs.append(torch.log((unit[i] - unit[nearest] + EPS).norm() + EPS))
    return -torch.stack(logs).mean()


def heads_reference(model, batch: dict) -> dict[str, torch.Tensor]:
    teacher, student, n_local = model.teacher, model.student, 2
    globals_, locals_ = batch["collated_global_crops"], batch["collated_local_crops"]
    masked = batch["mask_indices_list"]
    with torch.no_grad():
        out = teacher["backbone"](globals_, is_training=True)
        dino_targets = [sinkhorn_reference(t, TEACHER_TEMP) for t in teacher["dino_head"](out["x_norm_clstoken"])]
        patches = out["x_norm_patchtokens"].flatten(0, 1)[masked]
        ibot_targets = [sinkhorn_reference(t, TEACHER_TEMP) for t in teacher["ibot_head"](patches)]
    out = student["backbone"](globals_, masks=batch["collated_masks"], is_training=True)
    global_logits = student["dino_head"](out["x_norm_clstoken"])
    local_logits = student["dino_head"](student["backbone"](locals_, is_training=True)["x_norm_clstoken"])
    ibot_logits = student["ibot_head"](out["x_norm_patchtokens"].flatten(0, 1)[masked])
    rows = lambda x, crop: x[crop * IMAGES : (crop + 1) * IMAGES]  # noqa: E731 (crop-major rows)
    local = global_ = ibot = 0.0
    for level, target in enumerate(dino_targets):
        for crop in range(n_local):
            for view in range(2):
                local = local + cross_entropy(rows(target, view), rows(local_logits[level], crop)).mean()
        for crop in range(2):
            global_ = global_ + cross_entropy(rows(target, 1 - crop), rows(global_logits[level], crop)).mean()
        weighted = batch["masks_weight"] * cross_entropy(ibot_targets[level], ibot_logits[level])
        ibot = ibot + weighted.sum() / (2 * IMAGES)
    n_pairs = 2 + 2 * n_local
    views = out["x_norm_clstoken"].chunk(2)
    return {
        "dino_local_crops_loss": local / n_pairs,
        "dino_global_crops_loss": global_ / n_pairs,
        "koleo_loss": 0.1 * (koleo_reference(views[0]) + koleo_reference(views[1])),
        "ibot_loss": ibot,
    }


def linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def feature_term(kind: str, student: torch.Tensor, teacher: torch.Tensor, keys: torch.Tensor | None) -> torch.Tensor:
    """One term's mean over rows, written out."""
    if kind == "cosine":
        cosine = (student * teacher).sum(-1) / (student.norm(dim=-1) * teacher.norm(dim=-1))
        return (1 - cosine).mean()
    if kind == "smooth_l1":
        mean = teacher.mean(dim=-1, keepdim=True)
        std = ((teacher - mean) ** 2).mean(dim=-1, keepdim=True).add(1e-6).sqrt()
        diff = (student - (teacher - mean) / std).abs()
        return torch.where(diff < 1.0, 0.5 * diff**2, diff - 0.5).mean()
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    p_teacher = torch.softmax(unit(teacher) @ unit(keys).T / 0.05, dim=-1)
    log_student = torch.log_softmax(unit(student) @ unit(keys).T / 0.1, dim=-1)
    return (p_teacher * (p_teacher.log() - log_student)).sum(-1).mean()


def features_reference(model, batch: dict, kind: str, cls_center, patch_center, queue) -> dict[str, torch.Tensor]:
    projector = model.student["projector"]
    cls_total = patch_total = 0.0
    for count, images in ((2, batch["collated_global_crops"]), (2, batch["collated_local_crops"])):
        with torch.no_grad():
            out = model.teacher["backbone"](images, is_training=True)
            target_cls = out["x_norm_clstoken"] - cls_center
            target_patch = (out["x_norm_patchtokens"] - patch_center).flatten(0, 1)
        student = model.student["backbone"](images, is_training=True)
        cls = linear(student["x_norm_clstoken"], projector.cls)
        patch = linear(student["x_norm_patchtokens"], projector.patch).flatten(0, 1)
        keys = torch.cat([target_cls, queue]) if kind == "kl_queue" else None
        cls_total = cls_total + feature_term(kind, cls, target_cls, keys) * count / 4
        patch_kind = "cosine" if kind == "kl_queue" else kind
        patch_total = patch_total + feature_term(patch_kind, patch, target_patch, None) * count / 4
    return {"feature_cls_loss": cls_total, "feature_patch_loss": patch_total}


# ---------------------------------------------------------------------------------------------------------------------
# Losses


@pytest.mark.slow
def test_with_heads_the_loss_is_franca_s_objective_on_the_teacher_s_targets(teacher_file):
    model = float64_model(distill_config(teacher_file), "heads")
    batch = float64_batch()
    got = step_losses(model, batch, TEACHER_TEMP)
    expected = heads_reference(model, batch)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].item() == pytest.approx(value.item(), rel=1e-10), name
    assert model.student["dino_head"].out_dims == model.teacher["dino_head"].out_dims == [2, 4, 8, 16, 32]


@pytest.mark.parametrize("kind", ["cosine", "smooth_l1", "kl_queue"])
def test_head_free_losses_match_their_formulas_with_centred_targets_over_two_steps(teacher_file, kind):
    cfg = distill_config(teacher_file, "dino.koleo_loss_weight=0", f"distill.feature_loss={kind}")
    model = float64_model(cfg, "features")
    batch = float64_batch()
    width = model.teacher["backbone"].embed_dim
    zero = torch.zeros(width, dtype=torch.float64)
    got = step_losses(model, batch, TEACHER_TEMP)
    expected = features_reference(model, batch, kind, zero, zero, torch.zeros(0, width, dtype=torch.float64))
    for name, value in expected.items():
        assert got[name].item() == pytest.approx(value.item(), rel=1e-10), name

    # step 2: the targets are centred by the first step's mean (over global and local crops), and the queue holds the
    # first step's global teacher CLS features
    with torch.no_grad():
        first = [
            model.teacher["backbone"](batch[key], is_training=True)
            for key in ("collated_global_crops", "collated_local_crops")
        ]
    cls_center = torch.cat([o["x_norm_clstoken"] for o in first]).mean(dim=0)
    patch_center = torch.cat([o["x_norm_patchtokens"].flatten(0, 1) for o in first]).mean(dim=0)
    queue = first[0]["x_norm_clstoken"]
    got = step_losses(model, batch, TEACHER_TEMP)
    expected = features_reference(model, batch, kind, cls_center, patch_center, queue)
    for name, value in expected.items():
        assert got[name].item() == pytest.approx(value.item(), rel=1e-10), name


# ---------------------------------------------------------------------------------------------------------------------
# The frozen teacher


@pytest.mark.parametrize("mode", ["heads", "features"])
def test_the_teacher_gets_no_gradient_and_never_changes(teacher_file, mode):
    cfg = distill_config(
        teacher_file, f"distill.mode={mode}", "train.batch_size_per_gpu=4", "optim.epochs=1", "optim.warmup_epochs=0"
    )
    apply_scaling_rules(cfg, world_size=1)
    teacher = load_teacher(cfg)
    before = {k: v.clone() for k, v in teacher.modules.state_dict().items()}
    runtime = Runtime.resolve(cfg, torch.device("cpu"))
    model = build_model(cfg, runtime, meta_arch=partial(build_distill_meta_arch, teacher=teacher, mode=mode))
    step = build_train_step(cfg, model, runtime)
    batch = with_mask_lists(make_batch(torch.Generator().manual_seed(3)))
    students = {k: v.clone() for k, v in model.student.state_dict().items()}
    for iteration in (2, 3):
        step(batch, iteration)
        assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert not model.teacher.training and model.student.training
    assert all(torch.equal(before[k], v) for k, v in model.teacher.state_dict().items())
    assert any(not torch.equal(students[k], v) for k, v in model.student.state_dict().items())
    assert not any(key.startswith("teacher") and "signature" not in key for key in model.state_dict())


@pytest.mark.slow
def test_a_restart_with_another_teacher_is_refused(teacher_file, tmp_path):
    cfg = distill_config(teacher_file)
    model = float64_model(cfg, "heads")
    other = float64_model(distill_config(save_teacher(tmp_path / "other", seed=5)), "heads")
    other.load_state_dict(model.state_dict())  # what a resume does: the checkpoint's signature comes in
    with pytest.raises(RuntimeError, match="is not the teacher this run was trained against"):
        step_losses(other, float64_batch(), TEACHER_TEMP)


# ---------------------------------------------------------------------------------------------------------------------
# Config and mode


def test_distill_config_errors_name_the_key_and_the_fix(teacher_file):
    with pytest.raises(ConfigError, match="teacher.weights is empty"):
        load_distill_config(None, TINY_STEP)
    with pytest.raises(ConfigError, match="student.arch='resnet18' is unknown.*timm:"):
        distill_config(teacher_file, "student.arch=resnet18")
    with pytest.raises(ConfigError, match="set student.block_chunks=0"):
        distill_config(teacher_file, "student.arch=timm:resnet18", "student.block_chunks=2", "student.patch_size=8")
    with pytest.raises(ConfigError, match="distill.feature_loss"):
        distill_config(teacher_file, "distill.feature_loss=l2")
    with pytest.raises(ConfigError, match="unknown distill config key 'distill.queue_sise'.*'distill.queue_size'"):
        distill_config(teacher_file, "distill.queue_sise=3")
    with pytest.raises(ConfigError, match="unknown config key 'teacher.weights'"):
        load_config(None, ["teacher.weights=x"])  # the training config stays without the distill keys
    assert distill_config(teacher_file, "student.arch=timm:resnet18", "student.patch_size=8").student.arch


def test_the_progress_line_has_uniform_values_in_the_heads_mode_only(teacher_file):
    from franca.train.progress import model_uniform_values

    cfg = distill_config(teacher_file)
    heads, features = (float64_model(cfg, mode) for mode in ("heads", "features"))
    assert heads.has_clustering_heads and not features.has_clustering_heads
    assert set(model_uniform_values(heads, 1)) == {"dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss"}
    assert model_uniform_values(features, 1) == {}


def test_the_mode_follows_the_teacher_file(teacher_file, tmp_path):
    cfg = distill_config(teacher_file)
    with_heads = load_teacher(cfg)
    assert with_heads.l2_norm is True  # read from the run's config.yaml beside the export
    assert choose_mode("auto", with_heads) == "heads" and choose_mode("features", with_heads) == "features"
    backbone_only = tmp_path / "released.pth"
    state = {f"backbone.{k}": v for k, v in with_heads.modules["backbone"].state_dict().items()}
    save_teacher_release(state, with_heads.modules["backbone"].build_config(), backbone_only, 0)
    released = load_teacher(distill_config(backbone_only))
    assert choose_mode("auto", released) == "features"
    with pytest.raises(ValueError, match="has no dino_head"):
        choose_mode("heads", released)


# ---------------------------------------------------------------------------------------------------------------------
# The student export


@pytest.mark.parametrize("arch", ["vit", "timm"])
@pytest.mark.slow
def test_the_exported_student_loads_and_matches_the_trained_one(teacher_file, tmp_path, arch):
    overrides = ["distill.mode=features"]
    if arch == "timm":
        pytest.importorskip("timm")
        overrides += ["student.arch=timm:test_resnet", "student.patch_size=8"]
    model = float64_model(distill_config(teacher_file, *overrides), "features").float()
    step_losses(model, with_mask_lists(make_batch(torch.Generator().manual_seed(4))), TEACHER_TEMP)[
        "feature_cls_loss"
    ].backward()
    path = save_teacher_release(
        model.export_modules.state_dict(), model.export_modules["backbone"].build_config(), tmp_path / "s.pth", 0
    )
    assert set(torch.load(path, weights_only=True)["teacher"]) == {
        f"backbone.{k}" for k in model.student["backbone"].state_dict()
    }
    loaded = franca_from_checkpoint(path).eval()
    trained = model.student["backbone"].eval()
    assert isinstance(loaded, TimmBackbone) == (arch == "timm")
    images = torch.randn(3, 3, 16, 16)
    for key in ("x_norm_clstoken", "x_norm_patchtokens"):
        assert torch.equal(loaded.forward_features(images)[key], trained.forward_features(images)[key])


# ---------------------------------------------------------------------------------------------------------------------
# Runs (slow: trainers, subprocesses)

TINY_DISTILL_RUN = """
train: {batch_size_per_gpu: 8, dataset_path: "FashionMNIST:root=bundled:split=train", OFFICIAL_EPOCH_LENGTH: 3,
        num_workers: 0, log_period: 1, seed: 3}
student: {arch: vit_tiny, embed_dim: 16, depth: 1, num_heads: 2, patch_size: 4, drop_path_rate: 0.0, block_chunks: 0}
teacher: {warmup_teacher_temp_epochs: 1}
optim: {epochs: 3, warmup_epochs: 1, base_lr: 0.01, freeze_last_layer_epochs: 1}
crops: {global_crops_size: 16, local_crops_size: 8, local_crops_number: 2}
distill: {queue_size: 40}
"""


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]


@pytest.mark.slow
def test_resume_after_sigkill_equals_the_uninterrupted_distillation(teacher_file, tmp_path):
    config = tmp_path / "distill.yaml"
    config.write_text(TINY_DISTILL_RUN)
    command = [sys.executable, "-m", "franca.distill", "--config-file", str(config)]
    options = [f"teacher.weights={teacher_file}", "distill.mode=features", "distill.feature_loss=kl_queue"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run([*command, "--output-dir", str(full), *options], env=env, check=True, stdout=subprocess.DEVNULL)

    proc = subprocess.Popen([*command, "--output-dir", str(killed), *options], env=env, stdout=subprocess.DEVNULL)
    first_checkpoint = killed / "checkpoints" / "model_0000003.pth"
    deadline = time.monotonic() + 300
    while not first_checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first_checkpoint.exists() and not (killed / "eval" / "training_9").exists()
    checkpoint = torch.load(first_checkpoint, weights_only=True)["model"]
    assert "queue.features" in checkpoint and not any(k.startswith("teacher.") for k in checkpoint)

    subprocess.run([*command, "--output-dir", str(killed), *options], env=env, check=True, stdout=subprocess.DEVNULL)
    reference = {r["iteration"]: r for r in read_metrics(full)}
    resumed = {r["iteration"]: r for r in read_metrics(killed)}
    assert sorted(resumed) == sorted(reference) == list(range(9))
    for iteration, record in reference.items():
        for key in ("feature_cls_loss", "feature_patch_loss", "koleo_loss", "student_cls_spread", "lr"):
            assert resumed[iteration][key] == pytest.approx(record[key], rel=1e-6, abs=1e-7), (iteration, key)
    a = torch.load(full / "eval" / "training_9" / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    b = torch.load(killed / "eval" / "training_9" / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_a_timm_student_trains_evaluates_and_exports_to_onnx(teacher_file, tmp_path):
    pytest.importorskip("timm")
    pytest.importorskip("onnxruntime")
    from franca.eval import knn
    from franca.export import onnx

    config = tmp_path / "distill.yaml"
    config.write_text(TINY_DISTILL_RUN)
    out = tmp_path / "run"
    arch = ["student.arch=timm:test_resnet", "student.patch_size=8", "optim.epochs=1"]
    distill.main(["--config-file", str(config), "--output-dir", str(out), f"teacher.weights={teacher_file}", *arch])
    export = out / "eval" / "training_3" / "teacher_checkpoint.pth"
    assert any(k.startswith("dino_head.") for k in torch.load(export, weights_only=True)["teacher"])  # heads mode
    dataset = "FashionMNIST:root=bundled:split=test"
    record = knn.main(
        [
            "--weights",
            str(export),
            "--train-dataset",
            dataset,
            "--val-dataset",
            dataset,
            "--output-dir",
            str(tmp_path / "knn"),
            "--nb-knn",
            "5",
            "--num-workers",
            "0",
        ]
    )
    assert record["5"]["top1"] > 10.0
    assert onnx.main(["--weights", str(export), "--image-size", "16", "16", "--out", str(tmp_path / "s.onnx")]) == 0


@pytest.fixture(scope="module")
def released_vitb14(tmp_path_factory) -> Path:
    """A release-format ViT-B/14 teacher file with random weights (chunked block keys, ``backbone_config``) and random
    Matryoshka DINO / iBOT heads of 1,024 prototypes (the released files have none; a franca run's export has them)."""
    from franca.hub import franca_vitb14
    from franca.layers.heads import build_head

    torch.manual_seed(0)
    backbone = franca_vitb14(pretrained=False)
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    for name in ("dino_head", "ibot_head"):
        head = build_head("matryoshka", 768, 1024, 2048, 256, 3)
        state.update({f"{name}.{k}": v for k, v in head.state_dict().items()})
    path = tmp_path_factory.mktemp("vitb14") / "teacher_checkpoint.pth"
    return save_teacher_release(state, backbone.build_config(), path, block_chunks=4)


LARGE_RUN = """
train: {batch_size_per_gpu: 2, dataset_path: "FashionMNIST:root=bundled:split=train", OFFICIAL_EPOCH_LENGTH: 1,
        num_workers: 0, log_period: 1}
student: {arch: vit_small, patch_size: 14, drop_path_rate: 0.1, block_chunks: 4}
optim: {epochs: 1, warmup_epochs: 0, freeze_last_layer_epochs: 0}
crops: {global_crops_size: 224, local_crops_size: 98, local_crops_number: 2}
evaluation: {eval_period_iterations: 0}
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, overrides",
    [("heads", []), ("features", ["student.patch_size=16", "crops.local_crops_size=96"])],
    ids=["heads_vits14", "features_vits16"],
)
def test_a_released_vitb14_teacher_distils_into_a_vit_small_on_cpu(released_vitb14, tmp_path, mode, overrides):
    """The large path's mechanics, one iteration: ViT-B/14 teacher, ViT-S student (patch 16: the teacher's 16 x 16
    global and 7 x 7 local grids, of 96 px crops resized to 98, are resized to the student's 14 x 14 and 6 x 6)."""
    config = tmp_path / "large.yaml"
    config.write_text(LARGE_RUN)
    out = tmp_path / "run"
    argv = ["--config-file", str(config), "--output-dir", str(out), f"teacher.weights={released_vitb14}"]
    record = distill.main([*argv, f"distill.mode={mode}", *overrides])
    terms = ("dino_local_crops_loss", "ibot_loss") if mode == "heads" else ("feature_cls_loss", "feature_patch_loss")
    assert all(torch.isfinite(torch.tensor(record[term])) for term in terms)
    student = franca_from_checkpoint(out / "eval" / "training_1" / "teacher_checkpoint.pth")
    assert (student.embed_dim, student.patch_size) == (384, 16 if overrides else 14)


@pytest.mark.slow
def test_two_ranks_give_the_single_process_distillation(teacher_file, tmp_path):
    """torchrun with 2 gloo ranks (FSDP2, the frozen teacher sharded too) against one process on the same global batch
    of 8: the running centres (all-reduced means) and the kl_queue keys (the batch of all ranks, then the queue) make
    every rank's loss its share of the single-process loss. KoLeo stays off (its neighbours are per rank)."""
    from helpers import free_port

    config = tmp_path / "distill.yaml"
    config.write_text(TINY_DISTILL_RUN)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    options = [f"teacher.weights={teacher_file}", "distill.mode=features", "distill.feature_loss=kl_queue"]
    options += ["dino.koleo_loss_weight=0", "optim.epochs=2"]
    outputs = {}
    for ranks in (1, 2):
        out = outputs[ranks] = tmp_path / f"ranks{ranks}"
        distill_argv = ["-m", "franca.distill", "--config-file", str(config), "--output-dir", str(out)]
        distill_argv += [f"train.batch_size_per_gpu={8 // ranks}", *options]
        launcher = [sys.executable]
        if ranks > 1:
            launcher += ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
        result = subprocess.run([*launcher, *distill_argv], env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    single, double = ({r["iteration"]: r for r in read_metrics(outputs[ranks])} for ranks in (1, 2))
    assert sorted(single) == sorted(double) == list(range(6))
    for iteration, record in single.items():
        for key in ("feature_cls_loss", "feature_patch_loss"):
            assert double[iteration][key] == pytest.approx(record[key], rel=1e-4, abs=1e-5), (iteration, key)
        # sqrt(1 - |mean unit CLS|^2) of a near-collapsed random student: the sqrt turns float32 rounding of the
        # mean (1e-7) into up to 3e-4
        spreads = double[iteration]["student_cls_spread"], record["student_cls_spread"]
        assert spreads[0] == pytest.approx(spreads[1], abs=1e-3), (iteration, spreads)
    assert franca_from_checkpoint(outputs[2] / "eval" / "training_6" / "teacher_checkpoint.pth").embed_dim == 16
