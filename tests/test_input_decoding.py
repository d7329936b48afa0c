"""Decoding stored with the model: the trainer's ``train.alpha_background`` / ``train.image_max_value`` travel in the
teacher export's ``backbone_config`` and the safetensors folder's ``config.json``; the hub reads them back, and the
evaluation commands follow them unless a flag overrides them. Files without the entry keep working."""

import json

import numpy as np
import pytest
import torch
from helpers import TINY_MODEL
from PIL import Image

from franca.checkpoint.release import save_teacher_release
from franca.eval import knn
from franca.eval.lib.common import eval_settings, load_backbone_for_eval, make_eval_dataset, parse_eval_args
from franca.eval.lib.pictures import denormalise
from franca.hub import load_backbone
from franca.models.config import INPUT_DECODING_KEY, ViTConfig, stored_input_decoding
from franca.models.safetensors_folder import export_safetensors
from franca.models.vision_transformer import build_vit
from franca.train.config import load_config
from franca.train.ssl_meta_arch import SSLMetaArch

DATA = ["--batch-size", "4", "--num-workers", "0"]
LOADER = [*DATA, "--nb-knn", "1"]


def teacher_state(model: SSLMetaArch) -> dict:
    return {k: v for k, v in model.teacher.state_dict().items()}


@pytest.fixture(scope="module")
def black_export(tmp_path_factory):
    """A tiny run's teacher exported as the trainer does, trained with black under transparent pixels and a 12-bit
    maximum."""
    cfg = load_config(None, [*TINY_MODEL, "train.alpha_background=black", "train.image_max_value=4095"])
    model = SSLMetaArch(cfg)
    path = tmp_path_factory.mktemp("run") / "teacher_checkpoint.pth"
    save_teacher_release(teacher_state(model), model.teacher["backbone"].build_config(), path, block_chunks=2)
    return path


def test_the_teacher_export_carries_the_decoding_and_the_hub_reads_it(black_export, tmp_path):
    stored = torch.load(black_export, weights_only=True)["backbone_config"]
    expected = {"alpha_background": "black", "image_max_value": 4095.0}
    assert stored[INPUT_DECODING_KEY] == expected
    assert ViTConfig.from_dict(stored).embed_dim == 32  # side data, not a constructor field
    backbone = load_backbone(black_export)
    assert backbone.input_decoding == expected
    folder = export_safetensors(backbone, tmp_path / "folder")
    assert json.loads((folder / "config.json").read_text())[INPUT_DECODING_KEY] == expected
    assert load_backbone(folder).input_decoding == expected


def test_files_without_the_entry_load_with_no_decoding_and_bad_entries_are_refused(tmp_path):
    model = build_vit("vit_tiny", depth=1, patch_size=4, img_size=16)
    path = tmp_path / "old.pth"
    torch.save({"teacher": {"backbone." + k: v for k, v in model.state_dict().items()}}, path)
    assert load_backbone(path).input_decoding is None
    config = model.build_config()
    assert INPUT_DECODING_KEY not in config and stored_input_decoding(config) is None
    with pytest.raises(ValueError, match="input_decoding=.*must be a dict with the keys"):
        stored_input_decoding({INPUT_DECODING_KEY: {"gamma": 2.2}})


def rgba_folders(root) -> tuple[str, str]:
    """Two classes of transparent images: a half-transparent red or blue square on a fully transparent canvas."""
    for split, count in (("train", 3), ("val", 2)):
        for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.zeros((16, 16, 4), np.uint8)
                pixels[4 + i : 12, 4:12] = (*colour, 128)
                Image.fromarray(pixels, mode="RGBA").save(folder / f"{i}.png")
    return f"ImageFolder:root={root / 'train'}", f"ImageFolder:root={root / 'val'}"


def corner_pixel(weights, dataset: str, flags: list[str]) -> list[int]:
    """The top-left (transparent) pixel of the first image as an evaluation command decodes it for ``weights``."""
    argv = ["--weights", str(weights), "--output-dir", "o", *flags, *DATA]
    args = parse_eval_args(knn.get_args_parser(), argv)
    backbone = load_backbone_for_eval(args.weights, None)
    settings = eval_settings(args, backbone, classification=True)
    image = make_eval_dataset(dataset, settings.resize_size, settings.image_size[0], settings.decoding)[0][0]
    return denormalise(image)[0, 0].tolist()


def test_evaluation_follows_the_stored_decoding_unless_a_flag_overrides_it(black_export, tmp_path, capsys):
    train, val = rgba_folders(tmp_path / "images")
    argv = ["--weights", str(black_export), "--train-dataset", train, "--val-dataset", val, *LOADER]
    knn.main([*argv, "--output-dir", str(tmp_path / "stored")])
    assert "decoding alpha background black, image max value 4095 (the checkpoint's)" in capsys.readouterr().out
    stored = json.loads((tmp_path / "stored" / "results_eval_knn.json").read_text())["metadata"]
    assert stored["input_decoding"] == {
        "alpha_background": "black",
        "image_max_value": 4095.0,
        "from": "the checkpoint's",
    }

    knn.main([*argv, "--output-dir", str(tmp_path / "flag"), "--alpha-background", "white"])
    assert (
        "decoding alpha background white, image max value 4095 (flags and the checkpoint's)" in capsys.readouterr().out
    )
    flagged = json.loads((tmp_path / "flag" / "results_eval_knn.json").read_text())["metadata"]["input_decoding"]
    assert flagged["alpha_background"] == "white" and flagged["image_max_value"] == 4095.0
    assert corner_pixel(black_export, val, ["--train-dataset", train, "--val-dataset", val]) == [0, 0, 0]
    flags = ["--train-dataset", train, "--val-dataset", val, "--alpha-background", "white"]
    assert corner_pixel(black_export, val, flags) == [255, 255, 255]
