"""RASA evaluation parts against brute force and closed forms, and the rasa.eval command end to end."""

import itertools
import json

import numpy as np
import pytest
import torch

from rasa.head import RASAHead
from rasa.kmeans import assign_clusters, confusion_matrix, hungarian_match, kmeans, matched_miou
from rasa.regression import fit_linear_regression, predict, r2_scores


def brute_force_best_miou(clusters: np.ndarray, labels: np.ndarray, k: int, ignore: int) -> float:
    """Tries every one-to-one cluster→class map, keeps the one matching most pixels, scores its mIoU per pixel."""
    keep = labels != ignore
    best, best_map = -1, None
    for permutation in itertools.permutations(range(k)):
        matched = sum(int(np.sum((clusters[keep] == c) & (labels[keep] == permutation[c]))) for c in range(k))
        if matched > best:
            best, best_map = matched, permutation
    predicted = np.array([best_map[c] for c in clusters[keep]])
    truth = labels[keep]
    ious = []
    for cls in range(k):
        union = np.sum((predicted == cls) | (truth == cls))
        if union:
            ious.append(np.sum((predicted == cls) & (truth == cls)) / union)
    return 100 * float(np.mean(ious))


def test_hungarian_miou_equals_brute_force():
    rng = np.random.default_rng(0)
    k = 5
    labels = rng.integers(0, k, 400)
    clusters = (labels + 2) % k  # a relabelling ...
    noisy = rng.random(400) < 0.3
    clusters[noisy] = rng.integers(0, k, noisy.sum())  # ... with noise
    labels[rng.random(400) < 0.1] = 255
    confusion = confusion_matrix(torch.from_numpy(clusters), torch.from_numpy(labels), k, k, ignore_index=255)
    mapping = hungarian_match(confusion)
    assert mapping.tolist() == [(c - 2) % k for c in range(k)]
    miou, _ = matched_miou(confusion, mapping)
    assert miou == pytest.approx(brute_force_best_miou(clusters, labels, k, 255), abs=1e-9)


def test_torch_kmeans_recovers_separated_clusters():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]])
    truth = torch.arange(4).repeat_interleave(50)
    points = centres[truth] + 0.3 * torch.randn(200, 3, generator=generator)
    found = kmeans(points, 4, n_iter=20, n_redo=3, seed=1, backend="torch")
    clusters = assign_clusters(points, found)
    for cluster in range(4):  # each found cluster is exactly one true cluster
        assert len(set(truth[clusters == cluster].tolist())) == 1
    assert sorted(torch.bincount(clusters).tolist()) == [50, 50, 50, 50]
    assert torch.cdist(found, centres).min(1).values.max() < 0.2


def test_regression_matches_numpy_least_squares():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 6))
    y = x @ rng.normal(size=(6, 2)) + 0.5 + 0.1 * rng.normal(size=(300, 2))
    design = np.concatenate([x, np.ones((300, 1))], axis=1)
    solution, *_ = np.linalg.lstsq(design, y, rcond=None)
    weight, bias = fit_linear_regression(torch.from_numpy(x), torch.from_numpy(y), ridge=0.0)
    np.testing.assert_allclose(weight.numpy(), solution[:6].T, atol=1e-9)
    np.testing.assert_allclose(bias.numpy(), solution[6], atol=1e-9)
    prediction = predict(torch.from_numpy(x), weight, bias).numpy()
    expected = 1 - ((y - prediction) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(r2_scores(torch.from_numpy(prediction), torch.from_numpy(y)).numpy(), expected)


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    from franca.models.vision_transformer import build_vit

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("backbone") / "vit.pth"
    torch.save(build_vit("vit_tiny", depth=2, patch_size=8, img_size=64).state_dict(), path)
    return path


def test_eval_command_on_voc(tmp_path, tiny_backbone):
    from test_voc_coco import make_voc

    from rasa.eval import PLOT_FILE, RESULTS_FILE, main

    make_voc(tmp_path / "voc")
    head = RASAHead(192, n_pos_layers=1)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    record = main(
        [
            "--weights", str(tiny_backbone), "--rasa-weights", str(tmp_path / "head.pth"),
            "--dataset", f"VOC:root={tmp_path / 'voc'}:split=trainaug", "--output-dir", str(tmp_path / "out"),
            "--image-size", "64", "--mask-size", "24", "--num-workers", "0", "--num-plot-images", "2",
        ]
    )  # fmt: skip
    saved = json.loads((tmp_path / "out" / RESULTS_FILE).read_text())
    assert saved["stages"] == json.loads(json.dumps(record["stages"]))
    assert [s["removed_planes"] for s in saved["stages"]] == [0, 1, 2]
    assert saved["stages"][0]["variance_removed"] == pytest.approx(0.0, abs=1e-9)
    assert 0 < saved["stages"][2]["variance_removed"] < 1
    assert all(0 <= s["kmeans_miou"] <= 100 for s in saved["stages"])
    assert (tmp_path / "out" / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_refuses_a_head_for_another_embedding_size(tmp_path, tiny_backbone):
    from rasa.eval import main

    torch.save(RASAHead(384, n_pos_layers=2).state_dict(), tmp_path / "head384.pth")
    with pytest.raises(ValueError, match="embedding size 384.*192"):
        main(
            ["--weights", str(tiny_backbone), "--rasa-weights", str(tmp_path / "head384.pth"), "--dataset",
             f"ImageFolder:root={tmp_path}", "--output-dir", str(tmp_path / "out")]
        )  # fmt: skip
