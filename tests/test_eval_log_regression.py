import importlib.util
import json

import numpy as np
import pytest
import torch
from eval_data import IMAGE_OPTIONS, make_photo_folders, save_tiny_checkpoint, separable_features

from franca.eval import log_regression
from franca.eval.log_regression import c_grid, holdout_split, log_regression_eval
from franca.eval.logreg_backends import LinearModel, SklearnBackend, TorchBackend, make_backend


def penalised_objective(model: LinearModel, x: torch.Tensor, y: torch.Tensor, C: float) -> float:
    """Σ_i CE + ‖W‖²/(2C), written out in float64 with an explicit log-sum-exp."""
    logits = x.double() @ model.weight.T + model.bias
    shifted = logits - logits.max(dim=1, keepdim=True).values
    log_prob = shifted - shifted.exp().sum(dim=1, keepdim=True).log()
    return float(-log_prob[torch.arange(len(y)), y].sum() + model.weight.square().sum() / (2 * C))


def test_c_grid_is_the_original_logspace():
    grid = c_grid()
    assert len(grid) == 45
    assert grid[0] == pytest.approx(1e-6) and grid[-1] == pytest.approx(1e5)
    np.testing.assert_allclose(np.diff(np.log10(grid)), 11 / 44, rtol=1e-9)


def test_holdout_split_is_a_seeded_partition():
    fit, hold = holdout_split(50, 0.1, seed=3)
    assert len(hold) == 5 and len(fit) == 45
    assert sorted(torch.cat([fit, hold]).tolist()) == list(range(50))
    assert torch.equal(hold, holdout_split(50, 0.1, seed=3)[1])
    with pytest.raises(ValueError, match="too few to hold out"):
        holdout_split(1, 0.1)


@pytest.mark.parametrize("C", [0.05, 1.0, 20.0])
def test_torch_and_sklearn_backends_agree(C):
    """Overlapping classes (a unique, finite optimum): same probabilities, same weights, same objective."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(40)
    x = torch.randn(120, 6, generator=g) + 0.8 * torch.nn.functional.one_hot(labels, 6).double()
    x = x.double()
    ours = TorchBackend(device=torch.device("cpu")).fit(x, labels, C, 3)
    reference = SklearnBackend(tol=1e-10).fit(x, labels, C, 3)
    torch.testing.assert_close(ours.logits(x).softmax(1), reference.logits(x).softmax(1), atol=2e-5, rtol=0)
    torch.testing.assert_close(ours.weight, reference.weight, atol=1e-4, rtol=1e-4)
    assert penalised_objective(ours, x, labels, C) == pytest.approx(penalised_objective(reference, x, labels, C), 1e-7)


@pytest.mark.parametrize("backend", ["sklearn", "torch"])
def test_grid_recovers_separable_problem(backend):
    train_x, train_y = separable_features(60, num_classes=4, dim=16, seed=0)
    val_x, val_y = separable_features(30, num_classes=4, dim=16, seed=1)
    results = log_regression_eval(train_x, train_y, val_x, val_y, c_grid(3, -6, 0), make_backend(backend, max_iter=100))
    assert results["top1"] >= 99.0
    assert results["holdout_top1"][repr(results["best_c"])] == max(results["holdout_top1"].values())
    # the strongest regularisation (C = 1e-6) shrinks W to ~0, so it cannot be the best on a separable problem
    assert results["best_c"] > 1e-6


def test_absent_classes_never_win():
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    model = SklearnBackend().fit(x, torch.tensor([0, 0, 2, 2]), 1.0, num_classes=3)
    assert torch.isinf(model.bias[1]) and model.bias[1] < 0
    assert set(model.logits(x).argmax(1).tolist()) <= {0, 2}


def test_backend_choice():
    assert make_backend("auto").name == ("cuml" if importlib.util.find_spec("cuml") else "sklearn")
    with pytest.raises(ValueError, match="unknown logistic-regression backend 'svm'"):
        make_backend("svm")
    if importlib.util.find_spec("cuml") is None:
        with pytest.raises(ImportError, match="--backend cuml needs the cuml package.*--backend torch"):
            make_backend("cuml")


def test_command_end_to_end(tmp_path):
    train, val = make_photo_folders(tmp_path / "photos")
    weights = save_tiny_checkpoint(tmp_path / "tiny.pth")
    out = tmp_path / "out"
    log_regression.main(
        ["--weights", weights, "--train-dataset", train, "--val-dataset", val, "--output-dir", str(out)]
        + IMAGE_OPTIONS
        + ["--backend", "torch", "--c-grid-size", "3", "--max-iter", "50"]
    )
    record = json.loads((out / "results_eval_log_regression.json").read_text())
    assert record["backend"] == "torch" and len(record["c_values"]) == 3
    assert record["best_c"] in record["c_values"]
    assert 0.0 <= record["top1"] <= 100.0 and record["top1"] <= record["top5"]


@pytest.mark.cuda
def test_torch_backend_on_gpu_matches_sklearn():
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(4).repeat_interleave(50)
    x = (torch.randn(200, 12, generator=g) + torch.nn.functional.one_hot(labels, 12)).double()
    ours = TorchBackend(device=torch.device("cuda"), chunk_size=64).fit(x, labels, 0.5, 4)
    reference = SklearnBackend(tol=1e-10).fit(x, labels, 0.5, 4)
    assert ours.weight.device.type == "cpu"
    torch.testing.assert_close(ours.logits(x).softmax(1), reference.logits(x).softmax(1), atol=2e-5, rtol=0)
