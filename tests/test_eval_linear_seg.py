"""Linear segmentation: oracle features → mIoU 100, the two protocols' resolutions, a random tiny ViT with the last
blocks concatenated, and the command line."""

import json

import numpy as np
import pytest
import torch
from eval_data import OracleBackbone, make_tile_segfolder
from PIL import Image

from franca.data.datasets.segmentation_folder import SegFolder
from franca.eval import linear_seg
from franca.eval.lib.common import EvalSettings
from franca.eval.linear_seg import HeadSettings, make_protocol, precompute_train_features, run_linear_segmentation
from franca.models.vision_transformer import build_vit

CPU = torch.device("cpu")


def test_protocols_are_as_documented():
    franca = make_protocol("franca")
    assert franca.input_size == (448, 448) and franca.train_mask_size == franca.eval_mask_size == (100, 100)
    dinov2 = make_protocol("dinov2")
    assert dinov2.input_size == (504, 504) and dinov2.train_mask_size == (504, 504) and dinov2.eval_mask_size is None
    assert make_protocol("dinov2", (56, 84)).train_mask_size == (56, 84)
    small = make_protocol("franca", (64, 96))  # masks are never upsampled beyond the input size
    assert small.train_mask_size == small.eval_mask_size == (64, 96)
    with pytest.raises(ValueError, match="protocol 'ade' is unknown"):
        make_protocol("ade")


@pytest.mark.slow
def test_oracle_features_give_perfect_segmentation_at_the_input_size(tmp_path):
    root = make_tile_segfolder(tmp_path / "seg")
    train, val = SegFolder(str(root), "train"), SegFolder(str(root), "val")
    protocol = make_protocol("franca", (64, 64))
    features, masks = precompute_train_features(OracleBackbone(), train, protocol, 4, CPU)
    assert features.shape == (6, 4, 8, 8) and masks.shape == (6, 64, 64)
    results = run_linear_segmentation(
        OracleBackbone(), train, val, 4, EvalSettings((64, 64), batch_size=4), "franca",
        HeadSettings(epochs=20, train_batch_size=6, lr=0.1, weight_decay=0.0), CPU,
    )  # fmt: skip
    # every patch is classified right; only where two patches' logits are blended by the bilinear upsampling can the
    # arg-max boundary move off the tile edge (by under a pixel, when the classes' logit margins differ)
    assert results["mIoU"] > 99.5 and results["pixel_accuracy"] > 99.5
    # masks kept at the 64 px input size (not upsampled to 100): 3 val images of 64 x 64 pixels, row 0 ignored
    assert results["num_pixels"] == 3 * 63 * 64


@pytest.mark.slow
def test_dinov2_protocol_scores_at_original_mask_size(tmp_path):
    root = make_tile_segfolder(tmp_path / "seg", n_train=2, n_val=2, ignore_border=False)
    for path in (root / "val" / "images").iterdir():  # val images of another, non-square size
        Image.open(path).resize((96, 48)).save(path)
        mask = Image.open(root / "val" / "masks" / path.name).resize((96, 48), Image.NEAREST)
        mask.save(root / "val" / "masks" / path.name)
    torch.manual_seed(0)
    vit = build_vit("vit_tiny", depth=3, patch_size=8, img_size=64)
    results = run_linear_segmentation(
        vit, SegFolder(str(root), "train"), SegFolder(str(root), "val"), 4, EvalSettings((64, 64), batch_size=2),
        "dinov2", HeadSettings(n_last_blocks=2, epochs=2, train_batch_size=2, optimizer_name="sgd", lr=0.01), CPU,
    )  # fmt: skip
    assert results["num_pixels"] == 2 * 48 * 96
    assert results["feature_dim"] == 2 * 192
    assert 0.0 <= results["mIoU"] <= 100.0 and 0.0 <= results["pixel_accuracy"] <= 100.0
    assert np.isfinite(results["final_train_loss"])


def test_command_line_writes_results(tmp_path, capsys):
    root = make_tile_segfolder(tmp_path / "seg", tile=16, n_train=2, n_val=1)
    weights = tmp_path / "vit.pth"
    torch.save(build_vit("vit_tiny", depth=2, patch_size=8, img_size=32).state_dict(), weights)
    record = linear_seg.main(
        [
            "--weights", str(weights), "--output-dir", str(tmp_path / "out"), "--protocol", "franca",
            "--train-dataset", f"SegFolder:root={root}:split=train",
            "--val-dataset", f"SegFolder:root={root}:split=val",
            "--input-size", "32", "--epochs", "1", "--num-workers", "0",
        ]
    )  # fmt: skip
    written = json.loads((tmp_path / "out" / "results_eval_linear_seg.json").read_text())
    assert written["mIoU"] == record["mIoU"]
    assert written["protocol"] == {
        "name": "franca", "input_size": [32, 32], "train_mask_size": [32, 32], "eval_mask_size": [32, 32],
    }  # fmt: skip
    output = capsys.readouterr().out
    assert "linear head [1/1] eta" in output and "linear_seg (franca): mIoU" in output
