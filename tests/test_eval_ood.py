import json

import numpy as np
import pytest
import torch
from eval_data import IMAGE_OPTIONS, make_photo_folders, save_tiny_checkpoint
from PIL import Image
from skimage import data

from franca.eval import ood
from franca.eval.lib.logreg_backends import SklearnBackend
from franca.eval.ood import knn_distance_scores, ood_evaluation, probe_scores


def brute_knn_scores(train: np.ndarray, test: np.ndarray, k: int) -> np.ndarray:
    """−(k-th smallest Euclidean distance) between unit vectors, every distance computed in float64."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    return np.array([-np.sort(np.linalg.norm(train - z, axis=1))[k - 1] for z in test])


def gaussian_classes(n_per_class: int, centres: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(centres)).repeat_interleave(n_per_class)
    return centres[labels] + torch.randn(len(labels), centres.shape[1], generator=g), labels


def test_knn_scores_match_brute_force():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(60, 8, generator=g), torch.randn(15, 8, generator=g)
    scores = knn_distance_scores(train, test, ks=(1, 7, 60))
    for k in (1, 7, 60):
        np.testing.assert_allclose(scores[k].numpy(), brute_knn_scores(train.numpy(), test.numpy(), k), atol=1e-6)
    with pytest.raises(ValueError, match=r"1 <= k <= 60"):
        knn_distance_scores(train, test, ks=(61,))


def test_probe_scores_are_msp_and_logsumexp():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, -1.0]])
    model = SklearnBackend().fit(x, torch.tensor([0, 1, 2]), 1.0, 3)
    logits = x.double().numpy() @ model.weight.numpy().T + model.bias.numpy()
    scores = probe_scores(model, x)
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(scores["msp"].numpy(), probabilities.max(1), rtol=1e-12)
    np.testing.assert_allclose(scores["energy"].numpy(), np.log(np.exp(logits).sum(1)), rtol=1e-12)


def test_separable_out_of_distribution_gives_auroc_one():
    centres = 6 * torch.eye(3, 16)
    train, _ = gaussian_classes(40, centres, seed=0)
    in_test, _ = gaussian_classes(20, centres, seed=1)
    far, _ = gaussian_classes(20, -6 * torch.eye(3, 16), seed=2)  # the opposite directions
    results = ood_evaluation(train, in_test, {"far": far}, ks=(1, 10))
    assert results["far"]["knn_k1"] == {"auroc": 100.0, "fpr95": 0.0}
    assert results["far"]["knn_k10"] == {"auroc": 100.0, "fpr95": 0.0}


def test_identical_distributions_give_auroc_one_half():
    centres = 3 * torch.eye(4, 16)
    train, train_y = gaussian_classes(100, centres, seed=0)
    in_test, _ = gaussian_classes(150, centres, seed=1)
    same, _ = gaussian_classes(150, centres, seed=2)
    probe = SklearnBackend().fit(train, train_y, 1.0, 4)
    results = ood_evaluation(train, in_test, {"same": same}, ks=(5,), probe=probe)["same"]
    assert set(results) == {"knn_k5", "msp", "energy"}
    for score, m in results.items():
        assert 42.0 < m["auroc"] < 58.0, score
        assert m["fpr95"] > 85.0, score


@pytest.mark.slow
def test_command_end_to_end(tmp_path):
    train, test = make_photo_folders(tmp_path / "photos")
    rocket = tmp_path / "rocket"  # unlabelled OOD folder: images directly in the root
    rocket.mkdir()
    photo = data.rocket()[::3, ::3]
    for i in range(5):
        Image.fromarray(photo[8 * i : 8 * i + 64, 10 * i : 10 * i + 64]).save(rocket / f"{i}.png")
    weights = save_tiny_checkpoint(tmp_path / "tiny.pth")
    out = tmp_path / "out"
    argv = ["--weights", weights, "--train-dataset", train, "--test-dataset", test, "--output-dir", str(out)]
    argv += ["--ood-dataset", f"ImageFolder:root={rocket}"] + IMAGE_OPTIONS
    argv += ["--knn-k", "1", "3", "--backend", "sklearn", "--c-grid-size", "2"]
    ood.main(argv)
    record = json.loads((out / "results_eval_ood.json").read_text())
    assert record["probe"]["backend"] == "sklearn" and 0.0 <= record["probe"]["in_distribution_top1"] <= 100.0
    scores = record["results"][f"ImageFolder:root={rocket}"]
    assert set(scores) == {"knn_k1", "knn_k3", "msp", "energy"}
    for m in scores.values():
        assert 0.0 <= m["auroc"] <= 100.0 and 0.0 <= m["fpr95"] <= 100.0
