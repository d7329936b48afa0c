import importlib.util
import json
import warnings

import numpy as np
import pytest
import torch
from eval_data import IMAGE_OPTIONS, make_photo_folders, save_tiny_checkpoint, separable_features

from franca.eval import log_regression
from franca.eval.lib.logreg_backends import LinearModel, SklearnBackend, TorchBackend, make_backend
from franca.eval.lib.logreg_search import (
    c_grid,
    holdout_split,
    log_regression_eval,
    original_search,
    scaled_grid_size,
    scaled_search,
    scaled_tolerance,
    search_should_stop,
    select_c_and_fit,
)
from franca.eval.log_regression import PartialResults, search_settings


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
    assert make_backend("auto").name == ("cuml" if importlib.util.find_spec("cuml") else "torch")
    with pytest.raises(ValueError, match="unknown logistic-regression backend 'svm'"):
        make_backend("svm")
    if importlib.util.find_spec("cuml") is None:
        with pytest.raises(ImportError, match="--backend cuml needs the cuml package.*--backend torch"):
            make_backend("cuml")


@pytest.mark.parametrize("backend", ["sklearn", "torch"])
def test_a_fit_stopped_at_max_iter_is_reported_once_in_one_line(backend, capsys):
    train_x, train_y = separable_features(30, num_classes=3, dim=8)
    solver = make_backend(backend, max_iter=2)  # far too few iterations: every fit stops at the limit
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConvergenceWarning escapes: the search says it once, below
        select_c_and_fit(train_x.double(), train_y, c_grid(3, 0, 2), solver, num_classes=3)
    lines = [line for line in capsys.readouterr().out.splitlines() if "stopped at --max-iter" in line]
    assert len(lines) == 1 and lines[0].startswith("logistic regression: 4 of 4 fits stopped at --max-iter 2")
    assert "(refit)" in lines[0]
    converged = make_backend(backend, max_iter=1000).fit(train_x.double(), train_y, 1.0, 3)
    assert converged.converged


@pytest.mark.slow
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
    assert record["complete"] is True and record["protocol"] == "scaled"
    assert record["c_fitted"] == len(record["holdout_top1"]) <= 3


def teacher_problem(n: int, seed: int, dim: int = 8, num_classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ N(0, I), y = argmax(x @ T) for a fixed random T: separable, with small margins, so accuracy depends on C."""
    teacher = torch.randn(dim, num_classes, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x, (x @ teacher).argmax(1)


def test_scaled_grid_size_rule():
    # clamp(log10(n) - 1, 1, 4) values per decade over the 11 decades of 10^[-6, 5], plus the end point
    assert scaled_grid_size(5) == 12 and scaled_grid_size(100) == 12
    assert scaled_grid_size(150) == round(11 * (np.log10(150) - 1)) + 1 == 14
    assert scaled_grid_size(10_000) == 34
    assert scaled_grid_size(128_116) == 45 == len(c_grid())


def test_scaled_tolerance_is_relative_to_the_gradient_at_zero():
    x, y = teacher_problem(50, seed=0)
    x = 3.0 * x + 1.0
    weight = torch.zeros(4, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    torch.nn.functional.cross_entropy(x @ weight.T + bias, y, reduction="mean").backward()
    largest = max(weight.grad.abs().max().item(), bias.grad.abs().max().item())
    assert scaled_tolerance(x, y, 4) == pytest.approx(1e-5 * largest, rel=1e-12)
    assert scaled_tolerance(x, y, 4, relative=1e-2) == pytest.approx(1e-2 * largest, rel=1e-12)


def test_search_stops_after_patience_but_not_on_the_starting_plateau():
    assert not search_should_stop([10.0, 10.0, 10.0, 10.0, 10.0], patience=2)  # still on the plateau of C → 0
    assert not search_should_stop([10.0, 10.0, 50.0, 60.0, 55.0], patience=2)
    assert search_should_stop([10.0, 10.0, 50.0, 60.0, 55.0, 60.0], patience=2)  # a tie is no improvement
    assert search_should_stop([10.0, 100.0], patience=5)  # nothing beats 100%, and ties go to the smaller C
    assert not search_should_stop([10.0, 60.0, 50.0, 50.0, 100.0], patience=None)


@pytest.mark.parametrize("backend", [SklearnBackend(), TorchBackend(device=torch.device("cpu"))])
@pytest.mark.slow
def test_early_stop_fits_fewer_c_values_and_keeps_the_best(backend):
    x, y = teacher_problem(300, seed=0)
    grid = c_grid(23)
    steps = []
    _, best_c, holdout = select_c_and_fit(x, y, grid, backend, patience=2, on_step=steps.append)
    accuracies = list(holdout.values())
    assert len(holdout) < len(grid) and [s.c for s in steps] == grid[: len(holdout)]
    assert holdout[repr(best_c)] == max(accuracies)
    # stopped right after 2 C values without a strict improvement (ties go to the smaller C), or at 100%
    assert accuracies.index(max(accuracies)) == len(accuracies) - 3 or accuracies[-1] == 100.0


@pytest.mark.parametrize("backend", ["sklearn", "torch"])
@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.slow
def test_warm_start_equals_cold_start(backend, num_classes):
    """Overlapping classes (a unique optimum): starting from the solution at another C ends at the same model."""
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(num_classes).repeat_interleave(40)
    x = (
        torch.randn(len(labels), 5, generator=g, dtype=torch.float64) + torch.nn.functional.one_hot(labels, 5)
    ).double()
    solver = make_backend(backend)
    start = solver.fit(x, labels, 0.01, num_classes, tol=1e-10)
    warm = solver.fit(x, labels, 3.0, num_classes, init=start, tol=1e-10)
    cold = solver.fit(x, labels, 3.0, num_classes, tol=1e-10)
    torch.testing.assert_close(warm.logits(x).softmax(1), cold.logits(x).softmax(1), atol=1e-6, rtol=0)
    assert penalised_objective(warm, x, labels, 3.0) == pytest.approx(penalised_objective(cold, x, labels, 3.0), 1e-9)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_sklearn_warm_start_begins_at_the_given_model(num_classes):
    """From the optimum itself one solver iteration leaves the model where it is (the init reaches scikit-learn)."""
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(num_classes).repeat_interleave(30)
    x = (
        torch.randn(len(labels), 4, generator=g, dtype=torch.float64) + torch.nn.functional.one_hot(labels, 4)
    ).double()
    optimum = SklearnBackend(tol=1e-10).fit(x, labels, 1.0, num_classes)
    again = SklearnBackend(max_iter=1, tol=1e-6).fit(x, labels, 1.0, num_classes, init=optimum)
    torch.testing.assert_close(again.logits(x), optimum.logits(x), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_scaled_search_matches_the_full_grid_and_sklearn():
    """On a separable problem the scaled search (15 C values, relative tolerance, warm starts, early exit) is at
    least as accurate as the original 45-value search, and its model is scikit-learn's at the chosen C."""
    from sklearn.linear_model import LogisticRegression

    (train_x, train_y), (val_x, val_y) = teacher_problem(2000, seed=2), teacher_problem(1000, seed=102)
    backend = SklearnBackend()
    scaled = scaled_search(train_x, train_y, 3)
    ours = log_regression_eval(
        train_x,
        train_y,
        val_x,
        val_y,
        scaled.c_values,
        backend,
        tol=scaled.tol,
        patience=scaled.patience,
        warm_start=True,
    )
    original = original_search()
    full = log_regression_eval(train_x, train_y, val_x, val_y, original.c_values, backend)  # warm: same optimum, faster
    assert len(scaled.c_values) == 15 and len(full["holdout_top1"]) == 45
    assert ours["top1"] >= full["top1"] > 90.0
    reference = LogisticRegression(C=ours["best_c"], tol=1e-10, max_iter=10_000).fit(train_x.numpy(), train_y.numpy())
    reference_top1 = 100.0 * (reference.predict(val_x.numpy()) == val_y.numpy()).mean()
    assert abs(ours["top1"] - reference_top1) <= 100.0 / len(val_y)  # at most one borderline sample differs


def test_partial_results_after_each_c_survive_a_stop(tmp_path):
    """A run killed after its 2nd C leaves the results file with "complete": false and the best of those two."""
    x, y = teacher_problem(300, seed=0)
    val_x, val_y = teacher_problem(100, seed=1)
    partial = PartialResults(str(tmp_path), {"backend": "sklearn"}, val_x, val_y, lambda: {"seed": 0})
    path = tmp_path / "results_eval_log_regression.json"
    written = []

    def save_then_stop(step):
        partial(step)
        written.append(json.loads(path.read_text()))
        if step.done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        log_regression_eval(x, y, val_x, val_y, c_grid(12), SklearnBackend(), patience=3, on_step=save_then_stop)
    assert [record["c_fitted"] for record in written] == [1, 2]
    record = json.loads(path.read_text())
    assert record["complete"] is False and record["backend"] == "sklearn" and record["metadata"] == {"seed": 0}
    assert len(record["holdout_top1"]) == 2
    best = max(record["holdout_top1"], key=lambda c: (record["holdout_top1"][c], -float(c)))
    assert record["best_c"] == float(best)
    fit_idx, _ = holdout_split(len(y))
    model = SklearnBackend().fit(x[fit_idx], y[fit_idx], record["best_c"], 3)
    assert record["top1_before_refit"] == pytest.approx(
        100.0 * (model.logits(val_x).argmax(1) == val_y).double().mean().item(), abs=1.0
    )
    assert not list(tmp_path.glob(".*.tmp.*"))


def test_command_stopped_mid_search_leaves_partial_results(tmp_path, monkeypatch, capsys):
    train, val = make_photo_folders(tmp_path / "photos")
    weights = save_tiny_checkpoint(tmp_path / "tiny.pth")
    out = tmp_path / "out"
    fit = TorchBackend.fit
    calls = []

    def fit_then_stop(self, *args, **kwargs):
        calls.append(args[2])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(TorchBackend, "fit", fit_then_stop)
    with pytest.raises(KeyboardInterrupt):
        log_regression.main(
            ["--weights", weights, "--train-dataset", train, "--val-dataset", val, "--output-dir", str(out)]
            + IMAGE_OPTIONS
            + ["--backend", "torch", "--c-grid-size", "5", "--max-iter", "50", "--patience", "0"]
        )
    record = json.loads((out / "results_eval_log_regression.json").read_text())
    assert record["complete"] is False and record["c_fitted"] == 2 and record["protocol"] == "scaled"
    assert list(record["holdout_top1"]) == [repr(c) for c in calls[:2]]
    assert record["best_c"] in calls[:2]
    assert "stopped: the best result so far is in" in capsys.readouterr().out


def parse(*flags: str):
    return log_regression.get_args_parser().parse_args(
        ["--weights", "w", "--train-dataset", "t", "--val-dataset", "v", "--output-dir", "o", *flags]
    )


def test_original_protocol_flag():
    x, y = teacher_problem(1500, seed=0)
    original = search_settings(parse("--original-protocol"), x, y, 3)
    assert original.c_values == c_grid() and original.tol is None and original.patience is None
    assert not original.warm_start
    scaled = search_settings(parse(), x, y, 3)
    assert len(scaled.c_values) == 14 and scaled.patience == 3 and scaled.warm_start
    assert scaled.tol == pytest.approx(scaled_tolerance(x, y, 3))
    assert search_settings(parse("--patience", "0", "--tol", "1e-6"), x, y, 3).patience is None
    with pytest.raises(ValueError, match="cannot be combined with --c-grid-size"):
        search_settings(parse("--original-protocol", "--c-grid-size", "10"), x, y, 3)


@pytest.mark.cuda
def test_torch_backend_on_gpu_matches_sklearn():
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(4).repeat_interleave(50)
    x = (torch.randn(200, 12, generator=g) + torch.nn.functional.one_hot(labels, 12)).double()
    ours = TorchBackend(device=torch.device("cuda"), chunk_size=64).fit(x, labels, 0.5, 4)
    reference = SklearnBackend(tol=1e-10).fit(x, labels, 0.5, 4)
    assert ours.weight.device.type == "cpu"
    torch.testing.assert_close(ours.logits(x).softmax(1), reference.logits(x).softmax(1), atol=2e-5, rtol=0)
