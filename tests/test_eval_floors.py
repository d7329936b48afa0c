"""Floors beside a model's k-NN: the random-init and raw-pixel numbers of ``franca.eval.knn --baselines`` against a
brute-force computation written here, and the random-init ViT against the trainer's own initial teacher."""

import json

import numpy as np
import pytest
import torch
from eval_data import make_photo_folders
from helpers import TINY_MODEL

from franca.eval import knn
from franca.eval.lib.common import make_eval_dataset
from franca.eval.lib.floors import PixelFeatures, parse_baselines, seeded_vit
from franca.models.config import ViTConfig
from franca.models.vision_transformer import build_vit
from franca.train.config import load_config
from franca.train.ssl_meta_arch import SSLMetaArch
from franca.train.train import seed_everything

LOADER = ["--batch-size", "8", "--num-workers", "0", "--nb-knn", "1", "3"]
RUN_SEED = 7


def brute_force_top1(train, train_labels, test, test_labels, k: int, temperature: float = 0.07) -> float:
    """Weighted k-NN top-1 in float64 with explicit loops: cosine similarity, k largest, exp(sim / T) per class."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    correct = 0
    for x, label in zip(test, test_labels):
        similarities = train @ x
        votes = np.zeros(int(train_labels.max()) + 1)
        for j in np.argsort(-similarities, kind="stable")[:k]:
            votes[train_labels[j]] += np.exp(similarities[j] / temperature)
        correct += int(votes.argmax() == label)
    return 100.0 * correct / len(test)


def images_and_labels(dataset_str: str) -> tuple[torch.Tensor, np.ndarray]:
    dataset = make_eval_dataset(dataset_str, resize_size=37, crop_size=32)  # 32 · 256/224 rounded
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), np.array(labels)


@pytest.fixture(scope="module")
def run_export(tmp_path_factory):
    """A trained-looking export inside a run folder whose config.yaml names the seed it was initialised with."""
    run = tmp_path_factory.mktemp("run")
    (run / "config.yaml").write_text(f"train:\n  seed: {RUN_SEED}\n")
    export = run / "eval" / "training_5" / "teacher_checkpoint.pth"
    export.parent.mkdir(parents=True)
    torch.manual_seed(123)
    # LayerScale 1 (Franca: 1e-5): a random ViT's CLS tokens then differ between images by more than float32 rounding
    model = build_vit("vit_tiny", depth=2, patch_size=8, img_size=32, layerscale=1.0)
    teacher = {"backbone." + k: v for k, v in model.state_dict().items()}
    torch.save({"teacher": teacher, "backbone_config": model.build_config()}, export)  # as the trainer writes it
    return run, export, model


def test_floors_equal_a_brute_force_knn_on_the_same_images(run_export, tmp_path, capsys):
    run, export, model = run_export
    train, val = make_photo_folders(tmp_path / "photos", n_train=4, n_val=3)
    argv = ["--weights", str(export), "--output-dir", str(tmp_path / "out"), "--train-dataset", train]
    record = knn.main([*argv, "--val-dataset", val, *LOADER, "--baselines", "random-init,pixels"])
    written = json.loads((tmp_path / "out" / "results_eval_knn.json").read_text())
    assert written["floors"] == record["floors"]

    train_images, train_labels = images_and_labels(train)
    val_images, val_labels = images_and_labels(val)
    with torch.no_grad():
        initial = seeded_vit(model.config, RUN_SEED).eval()
        features = {
            "model": (model.eval()(train_images), model(val_images)),
            "random-init": (initial(train_images), initial(val_images)),
            "pixels": (train_images.flatten(1), val_images.flatten(1)),  # 32 px: no pooling below 32 a side
        }
    for name, (train_features, val_features) in features.items():
        result = record if name == "model" else record["floors"][name]
        for k in (1, 3):
            expected = brute_force_top1(
                train_features.double().numpy(), train_labels, val_features.double().numpy(), val_labels, k
            )
            assert result[str(k)]["top1"] == pytest.approx(expected), (name, k)
    assert record["floors"]["pixels"]["feature_dim"] == 3 * 32 * 32
    assert f"seed {RUN_SEED}, train.seed of {run / 'config.yaml'}" in record["floors"]["random-init"]["source"]
    console = capsys.readouterr().out
    assert "model" in console and "random-init" in console and "pixels" in console


@pytest.mark.slow
def test_the_run_s_exported_initial_teacher_is_preferred(run_export, tmp_path):
    run, export, _ = run_export
    initial = run / "eval" / "training_0" / "teacher_checkpoint.pth"
    initial.parent.mkdir()
    torch.save({"teacher": {"backbone." + k: v for k, v in seeded_vit(ViTConfig(), 0).state_dict().items()}}, initial)
    try:
        from franca.eval.lib.floors import random_init
        from franca.hub import load_backbone

        floor = random_init(load_backbone(export), str(export), seed=0)
        assert "initial teacher" in floor.source and floor.backbone.embed_dim == 768
    finally:
        initial.unlink()
        initial.parent.rmdir()


def test_seeded_vit_is_the_trainer_s_initial_teacher():
    cfg = load_config(None, [*TINY_MODEL, f"train.seed={RUN_SEED}"])
    seed_everything(cfg.train.seed)
    teacher = SSLMetaArch(cfg).teacher["backbone"].state_dict()
    config = ViTConfig.from_student_config(cfg.student, img_size=cfg.crops.global_crops_size)
    rebuilt = seeded_vit(config, RUN_SEED).state_dict()
    assert teacher.keys() == rebuilt.keys() and all(torch.equal(teacher[k], rebuilt[k]) for k in teacher)


def test_pixels_are_pooled_to_at_most_32_a_side_and_names_are_checked():
    x = torch.arange(2 * 3 * 64 * 48, dtype=torch.float32).reshape(2, 3, 64, 48)
    pooled = PixelFeatures()(x)
    expected = torch.nn.functional.avg_pool2d(x, 2).flatten(1)  # 64 x 48 → 32 x 24
    assert torch.equal(pooled, expected)
    assert parse_baselines("pixels, random-init") == ["pixels", "random-init"]
    with pytest.raises(ValueError, match="unknown \\['imagenet'\\]; choose from random-init, pixels"):
        parse_baselines("imagenet")
