"""HummingBird in-context segmentation: retrieval against a brute-force reference, sampling, end to end on real
photo grids (oracle features → mIoU 100; a random tiny ViT → a valid number), and the command line."""

import json

import pytest
import torch
from eval_data import OracleBackbone, make_tile_segfolder

from franca.data.datasets.segmentation_folder import SegFolder
from franca.eval import hummingbird
from franca.eval.hummingbird import (
    HummingbirdSettings,
    NearestNeighbours,
    rare_class_first_indices,
    retrieve_class_scores,
    run_hummingbird,
)
from franca.eval.lib.common import EvalSettings
from franca.models.rasa_head import RASAHead
from franca.models.vision_transformer import build_vit


def test_retrieval_matches_brute_force_softmax_vote():
    torch.manual_seed(0)
    memory = torch.nn.functional.normalize(torch.randn(50, 6), dim=1)
    labels = torch.softmax(torch.randn(50, 3), dim=1)
    queries = torch.randn(7, 6)
    k, tau = 5, 0.1
    scores = retrieve_class_scores(queries, labels, NearestNeighbours(memory, "torch", torch.device("cpu")), k, tau)
    for q in range(len(queries)):
        query = queries[q] / queries[q].norm()
        sims = [(float(query @ memory[m]), m) for m in range(len(memory))]
        top = sorted(sims, reverse=True)[:k]
        weights = torch.tensor([s / tau for s, _ in top], dtype=torch.float64).exp()
        weights /= weights.sum()
        expected = sum(w * labels[m].double() for w, (_, m) in zip(weights, top))
        torch.testing.assert_close(scores[q].double(), expected, atol=1e-5, rtol=0)


def test_faiss_search_equals_torch_search():
    pytest.importorskip("faiss")
    torch.manual_seed(1)
    memory = torch.nn.functional.normalize(torch.randn(300, 16), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(20, 16), dim=1)
    faiss_sims, faiss_idx = NearestNeighbours(memory, "faiss", torch.device("cpu")).search(queries, 8)
    torch_sims, torch_idx = NearestNeighbours(memory, "torch", torch.device("cpu"), chunk_size=7).search(queries, 8)
    torch.testing.assert_close(faiss_sims, torch_sims, atol=1e-5, rtol=0)
    assert torch.equal(faiss_idx, torch_idx)


def test_sampling_prefers_rare_classes_and_skips_unlabelled_patches():
    distribution = torch.zeros(16, 3)
    distribution[0, 2] = 1.0  # one patch of the rare class 2
    distribution[1:14, 0] = 1.0  # thirteen patches of class 0; patches 14 and 15 stay empty (fully ignored)
    generator = torch.Generator().manual_seed(0)
    picks = [rare_class_first_indices(distribution, 1, generator).item() for _ in range(300)]
    assert sum(p == 0 for p in picks) / len(picks) > 0.6  # uniform sampling would give 1/14
    everything = rare_class_first_indices(distribution, 16, generator)
    assert sorted(everything.tolist()) == list(range(14))


def test_oracle_features_segment_perfectly(tmp_path):
    root = make_tile_segfolder(tmp_path / "seg")
    train, val = SegFolder(str(root), "train"), SegFolder(str(root), "val")
    results = run_hummingbird(
        OracleBackbone(), train, val, 4, EvalSettings((64, 64), batch_size=4),
        HummingbirdSettings(memory_size=200, augmentation_epochs=0, nn_backend="torch"), torch.device("cpu"),
    )  # fmt: skip
    assert results["mIoU"] == pytest.approx(100.0)
    assert results["pixel_accuracy"] == pytest.approx(100.0)
    assert results["patches_per_image"] == 200 // 6
    assert results["memory_entries"] == 6 * (200 // 6)
    assert results["num_pixels"] == 3 * 63 * 64  # the ignored first row of each val mask is not counted


@pytest.mark.slow
def test_random_vit_with_augmented_memory_gives_a_valid_miou(tmp_path):
    root = make_tile_segfolder(tmp_path / "seg", n_train=3, n_val=2)
    torch.manual_seed(0)
    vit = build_vit("vit_tiny", depth=2, patch_size=8, img_size=64)
    results = run_hummingbird(
        vit, SegFolder(str(root), "train"), SegFolder(str(root), "val"), 4, EvalSettings((64, 64), batch_size=2),
        HummingbirdSettings(
            patches_per_image=20, augmentation_epochs=2, num_neighbours=7, eval_resolution="original",
            nn_backend="torch",
        ),
        torch.device("cpu"),
    )  # fmt: skip
    assert 0.0 <= results["mIoU"] <= 100.0
    assert results["memory_entries"] == 3 * 2 * 20
    with pytest.raises(ValueError, match="not divisible by the backbone's patch size 8"):
        run_hummingbird(vit, SegFolder(str(root), "train"), SegFolder(str(root), "val"), 4, EvalSettings((60, 60)))


def test_command_line_writes_results_with_rasa_features(tmp_path, capsys):
    root = make_tile_segfolder(tmp_path / "seg", tile=16, n_train=2, n_val=1)
    weights, rasa = tmp_path / "vit.pth", tmp_path / "rasa.pth"
    torch.save(build_vit("vit_tiny", depth=2, patch_size=8, img_size=32).state_dict(), weights)
    torch.save(RASAHead(192, n_pos_layers=2).state_dict(), rasa)
    record = hummingbird.main(
        [
            "--weights", str(weights), "--rasa-weights", str(rasa), "--output-dir", str(tmp_path / "out"),
            "--train-dataset", f"SegFolder:root={root}:split=train",
            "--val-dataset", f"SegFolder:root={root}:split=val",
            "--input-size", "32", "--memory-size", "40", "--augmentation-epochs", "0", "--num-workers", "0",
        ]
    )  # fmt: skip
    written = json.loads((tmp_path / "out" / "results_eval_hummingbird.json").read_text())
    assert written["mIoU"] == record["mIoU"] and written["rasa_weights"] == str(rasa)
    assert written["num_classes"] == 4 and written["patches_per_image"] == 16
    output = capsys.readouterr().out
    assert "memory pass 1/1 [2/2] eta" in output and "hummingbird: mIoU" in output
