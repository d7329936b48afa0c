"""Smoke and correctness tests of the benchmark scripts (benchmarks/train_step.py, benchmarks/data_pipeline.py) on CPU.

No timed assertion: timings are only checked to be positive and finite. FLOP counts are checked against closed forms
from the matmul shapes of a tiny ViT (the batched augmentations: tests/test_batched_augmentations.py).
"""

import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from franca.train.parallel import apply_activation_checkpointing

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import data_pipeline  # noqa: E402
import train_step  # noqa: E402

pytestmark = pytest.mark.slow  # every test here trains or launches ranks

CONFIG = str(Path(__file__).resolve().parents[1] / "configs/train/IN21K/vitb14.yaml")
DIM, DEPTH, PATCH, GLOBAL, LOCAL, N_LOCAL, BATCH = 192, 2, 8, 32, 16, 2, 2
TINY = [
    "student.arch=vit_tiny",
    f"student.depth={DEPTH}",
    f"student.block_chunks={DEPTH}",  # the recipe's 4 chunks need at least 4 blocks
    f"student.patch_size={PATCH}",
    "student.ffn_layer=mlp",
    "student.drop_path_rate=0.0",  # stochastic depth skips part of the batch: FLOPs would fall below the closed forms
    f"crops.global_crops_size={GLOBAL}",
    f"crops.local_crops_size={LOCAL}",
    f"crops.local_crops_number={N_LOCAL}",
    "dino.head_n_prototypes=64",
    "ibot.head_n_prototypes=64",
    "dino.head_hidden_dim=32",
    "ibot.head_hidden_dim=32",
    "dino.head_bottleneck_dim=16",
    "ibot.head_bottleneck_dim=16",
    "optim.epochs=2",
    "optim.warmup_epochs=1",
    "train.OFFICIAL_EPOCH_LENGTH=10",
    "teacher.warmup_teacher_temp_epochs=1",
]


def vit_forward_flops(n_images: int, side: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of the tiny ViT forward: patch-embed conv, then per block qkv, attention
    (QKᵀ and AV), projection and the 4×-wide MLP, on 1 + (side/patch)² tokens."""
    n = (side // PATCH) ** 2
    t = n + 1
    patch_embed = 2 * (3 * PATCH * PATCH) * DIM * n
    block = 2 * t * DIM * 3 * DIM + 4 * t * t * DIM + 2 * t * DIM * DIM + 2 * (2 * t * DIM * 4 * DIM)
    return n_images * (patch_embed + DEPTH * block)


@pytest.fixture(scope="module")
def train_step_run(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("perf")
    argv = ["--config", CONFIG, "--batch-sizes", str(BATCH), "--steps", "2", "--warmup", "1", "--device", "cpu"]
    argv += ["--breakdown", "--peak-size", "64", "--out", str(out), "--results-md", str(out / "RESULTS.md"), *TINY]
    return train_step.main(argv), out


@pytest.mark.slow
def test_train_step_writes_json_with_plausible_fields(train_step_run):
    payload, out = train_step_run
    assert json.loads((out / "train_step.json").read_text()) == payload
    (run,) = payload["runs"]
    assert run["batch_size"] == BATCH and run["compile"] is False and run["autocast_dtype"] == "float32"
    assert run["model"].startswith("vit_tiny/8 (5-level MRL")
    for key in ("mean", "median", "min", "max"):
        assert 0 < run["step_ms"][key] < 60_000
    assert run["img_per_s"] == pytest.approx(BATCH / (run["step_ms"]["mean"] / 1000))
    assert run["mfu"] == pytest.approx(
        run["flops_per_step"] / (run["step_ms"]["mean"] / 1000) / run["matmul_peak"]["flops_per_s"]
    )
    assert run["peak_memory_gib"] is None  # CPU: no CUDA allocator statistics
    assert set(run["breakdown_ms"]) == set(train_step.TRAIN_STEP_PHASES)
    assert all(ms > 0 for ms in run["breakdown_ms"].values())
    assert run["environment"]["torch"] == torch.__version__ and run["environment"]["date"]
    assert "matmul" in run["flop_counter"] and run["command"].startswith("python benchmarks/train_step.py")
    section = (out / "RESULTS.md").read_text()
    assert "## Training step" in section and "| vit_tiny/8" in section and run["environment"]["date"][:10] in section


def test_train_step_flops_match_the_matmul_shapes(train_step_run):
    (run,) = train_step_run[0]["runs"]
    phases = run["breakdown_flops"]
    teacher = vit_forward_flops(2 * BATCH, GLOBAL)
    student_forward = vit_forward_flops(2 * BATCH, GLOBAL) + vit_forward_flops(N_LOCAL * BATCH, LOCAL)
    assert phases["teacher_backbone"] == teacher
    assert phases["student_backbone"] == student_forward
    assert phases["optimizer_ema"] == 0  # AdamW, clipping and EMA are elementwise: not counted
    # Backward: each block linear needs two matmuls of its forward size (input and weight gradients); attention and
    # patch-embed gradients only add to this lower bound.
    n_g, n_l = (GLOBAL // PATCH) ** 2 + 1, (LOCAL // PATCH) ** 2 + 1
    linear_forward = DEPTH * 24 * DIM * DIM * (2 * BATCH * n_g + N_LOCAL * BATCH * n_l)
    assert phases["backward"] >= 2 * linear_forward
    # The library step counts exactly what the instrumented copy counts (same calls, same masks).
    assert sum(phases.values()) == run["flops_per_step"]
    lower = teacher + student_forward + 2 * linear_forward
    # Upper: backbone backward at most 3× its forward (attention backward is ≤ 2.5×), plus the tiny heads.
    assert lower <= run["flops_per_step"] <= teacher + 4 * student_forward


@pytest.mark.slow
def test_train_step_runs_on_the_trainer_loader(tmp_path):
    data_pipeline.make_jpegs(tmp_path / "jpegs", 4, (160, 120))
    argv = ["--config", CONFIG, "--batch-sizes", "2", "--steps", "1", "--warmup", "0", "--device", "cpu"]
    argv += ["--data", "loader", "--dataset", f"ImageFolder:root={tmp_path / 'jpegs'}", "--num-workers", "0"]
    payload = train_step.main([*argv, "--peak-size", "64", "--out", str(tmp_path), *TINY])
    (run,) = payload["runs"]
    assert run["data"] == "loader" and run["img_per_s"] > 0
    assert run["data_wait_ms_mean"] > 0  # decoding and augmenting happen inside the timed step


@pytest.mark.slow
def test_chunked_losses_flag_runs_both_loss_paths(tmp_path):
    argv = ["--config", CONFIG, "--batch-sizes", str(BATCH), "--steps", "1", "--warmup", "0", "--device", "cpu"]
    argv += ["--chunked-losses", "false", "true", "--peak-size", "64", "--out", str(tmp_path), *TINY]
    payload = train_step.main(argv)
    plain, chunked = payload["runs"]
    assert (plain["chunked_losses"], plain["loss_chunk_size"]) == ("false", None)
    assert (chunked["chunked_losses"], chunked["loss_chunk_size"]) == ("true", 256)
    assert chunked["img_per_s"] > 0
    # The same matmuls either way: the chunked losses change how the elementwise loss work is done.
    assert chunked["flops_per_step"] == plain["flops_per_step"]
    assert "eager float32 chunked" in train_step.results_table(payload["runs"])


@pytest.mark.parametrize("chunked_losses", ["false", "true"])
@pytest.mark.slow
def test_instrumented_step_equals_the_trainer_step(chunked_losses):
    args = train_step.get_args_parser().parse_args(["--config", CONFIG, *TINY])
    cfg = train_step.build_config(CONFIG, BATCH, args, chunked_losses)
    torch.manual_seed(0)
    reference = train_step.make_train_step(cfg, train_step.Runtime.resolve(cfg, torch.device("cpu")))
    instrumented = copy.deepcopy(reference)
    batch = train_step.synthetic_batches(cfg, torch.device("cpu"), n_mask_sets=1)[0]
    torch.manual_seed(1)
    expected = reference(batch, 3)
    torch.manual_seed(1)
    got = train_step.timed_step(instrumented, batch, 3, train_step.DeviceClock(torch.device("cpu")))
    assert (
        got.keys() == expected.keys() == {"dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss"}
    )
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])
    for (name, p), (_, q) in zip(
        reference.model.named_parameters(), instrumented.model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(q, p, msg=name)


def test_synthetic_batches_have_the_collated_format():
    args = train_step.get_args_parser().parse_args(["--config", CONFIG, *TINY])
    cfg = train_step.build_config(CONFIG, 4, args)
    batches = train_step.synthetic_batches(cfg, torch.device("cpu"), n_mask_sets=3)
    n_tokens = (GLOBAL // PATCH) ** 2
    for batch in batches:
        assert batch["collated_global_crops"].shape == (8, 3, GLOBAL, GLOBAL)
        assert batch["collated_local_crops"].shape == (N_LOCAL * 4, 3, LOCAL, LOCAL)
        masks = batch["collated_masks"]
        assert masks.shape == (8, n_tokens) and masks.dtype == torch.bool
        assert (masks.any(dim=1)).sum() == 4  # mask_sample_probability 0.5 of the 2B global crops
        assert torch.equal(batch["mask_indices_list"], masks.flatten().nonzero().flatten())
        # Each masked image's token weights sum to one.
        assert float(batch["masks_weight"].sum()) == pytest.approx(4.0)
    assert not torch.equal(batches[0]["collated_masks"], batches[1]["collated_masks"])


def test_merge_records_replaces_a_rerun():
    old = [{"config": "a", "batch_size": 32, "compile": False, "dtype": "auto", "data": "synthetic", "img_per_s": 1}]
    rerun = dict(old[0], img_per_s=2)
    other = dict(old[0], compile=True, img_per_s=3)
    checkpointed = dict(old[0], overrides=["compute_precision.activation_checkpointing=true"], img_per_s=4)
    assert train_step.merge_records(old, rerun) == [rerun]
    assert train_step.merge_records(old, other) == [old[0], other]
    assert train_step.merge_records(old, checkpointed) == [old[0], checkpointed]


# ------------------------------------------------------------------------------------------------ data pipeline
def test_make_jpegs_writes_real_photos_at_imagenet_like_sizes(tmp_path):
    paths = data_pipeline.make_jpegs(tmp_path, 12, (500, 375), seed=1)
    assert len(paths) == 12
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            width, height = sorted(image.size, reverse=True)
            assert 0.8 * 375 - 1 <= min(image.size) and max(image.size) <= 1.2 * 500 + 1
            pixels = np.asarray(image, dtype=np.float32)
        assert pixels.std() > 10  # a photo, not a flat fill
    assert len({path.read_bytes() for path in paths}) == 12


@pytest.mark.slow
def test_data_pipeline_cli_reports_throughput_and_cores(tmp_path):
    steps_json = tmp_path / "train_step.json"
    steps_json.write_text(json.dumps({"runs": [{"model": "m", "batch_size": 64, "compile": True, "img_per_s": 90.0}]}))
    argv = ["--make-jpegs", "6", "--size", "160x120", "--workers", "0", "1", "--batch-size", "2"]
    argv += ["--batches-per-worker", "1", "--device", "cpu", "--tensor-batches", "1", "--target-rates", "100"]
    argv += ["--train-step-json", str(steps_json), "--out", str(tmp_path)]
    payload = data_pipeline.main(argv)
    assert json.loads((tmp_path / "data_pipeline.json").read_text()) == payload
    assert payload["images"]["count"] == 6
    runs = payload["cpu_loader"]
    assert [(r["path"], r["workers"]) for r in runs] == [
        ("per_sample", 0),
        ("per_sample", 1),
        ("split", 0),
        ("split", 1),
    ]
    assert all(r["img_per_s"] > 0 for r in runs)
    per_core = payload["img_per_s_per_core"]
    assert per_core == {"per_sample": runs[1]["img_per_s"], "split": runs[3]["img_per_s"]}
    assert {r["mode"] for r in payload["tensor_path"]} == {"batched", "per_image"}
    assert all(r["img_per_s"] > 0 and r["device"] == "cpu" for r in payload["tensor_path"])
    rates = payload["target_rates"]
    assert rates == {"100 img/s": 100.0, "m batch 64 compiled (measured)": 90.0}
    assert payload["cores_needed"] == {
        path: {name: math.ceil(rate / per_core[path]) for name, rate in rates.items()} for path in per_core
    }
    assert "split (decode + crops + parameter draws), 1 workers" in data_pipeline.pipeline_table(payload)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of CPU-only machines")
@pytest.mark.slow
def test_data_pipeline_skips_the_gpu_path_without_cuda(tmp_path, capsys):
    data_pipeline.make_jpegs(tmp_path / "jpegs", 4, (160, 120))
    argv = ["--images-dir", str(tmp_path / "jpegs"), "--workers", "0", "--batch-size", "2", "--batches-per-worker", "1"]
    payload = data_pipeline.main([*argv, "--out", str(tmp_path)])
    assert payload["tensor_path"] == []
    assert "GPU decode + augmentation path is skipped" in capsys.readouterr().out


@pytest.mark.slow
def test_train_step_with_activation_checkpointing_counts_model_flops(train_step_run, tmp_path, monkeypatch):
    """The override reaches the student's blocks; the FLOP count (MFU) excludes the recomputation."""
    (plain,) = train_step_run[0]["runs"]
    checkpointed = []

    def record(blocks):
        checkpointed.append(len(blocks))
        apply_activation_checkpointing(blocks)

    monkeypatch.setattr(train_step, "apply_activation_checkpointing", record)
    argv = ["--config", CONFIG, "--batch-sizes", str(BATCH), "--steps", "1", "--warmup", "0", "--device", "cpu"]
    override = "compute_precision.activation_checkpointing=true"
    payload = train_step.main([*argv, "--peak-size", "64", "--out", str(tmp_path), *TINY, override])
    (run,) = payload["runs"]
    assert checkpointed == [DEPTH]
    assert run["overrides"][-1] == override and run["flops_per_step"] == plain["flops_per_step"]
    assert override in train_step.results_table([run])


@pytest.mark.slow
def test_clustering_ablation_trains_each_variant_once_and_scores_it(tiny_config, tmp_path, monkeypatch):
    import clustering_ablation

    out = tmp_path / "ablation"
    argv = [
        "--config-file",
        str(tiny_config),
        "--variants",
        "recipe",
        "koleo_only",
        "--output-dir",
        str(out),
        "--test-dataset",
        "FashionMNIST:root=bundled:split=test",
        "--knn-train-samples",
        "200",
        "--knn-test-samples",
        "100",
    ]
    results = clustering_ablation.main(argv)
    recipe, koleo = results["variants"]["recipe"], results["variants"]["koleo_only"]
    assert len(recipe["dino_target_entropy"]) == 5 and len(recipe["ibot_target_entropy"]) == 5
    assert recipe["losses"]["dino_local_crops_loss"] > 0 and koleo["losses"]["dino_local_crops_loss"] == 0
    assert all(0 <= r["knn_top1"] <= 100 for r in (recipe, koleo)) and 0 <= results["random_init_knn"] <= 100
    assert "| koleo_only |" in (out / "results.md").read_text()

    def no_training(argv):
        raise AssertionError(f"finished variants are reused, not retrained: {argv}")

    monkeypatch.setattr(clustering_ablation.trainer, "main", no_training)
    again = clustering_ablation.main(argv)
    assert again["variants"]["recipe"]["knn_top1"] == recipe["knn_top1"]
