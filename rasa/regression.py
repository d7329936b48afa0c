"""Linear read-out of patch position from features: closed-form least squares, MSE, R² and variance shares.

These measure how much absolute position a feature still encodes linearly, the quantity RASA removes (reference §8).
"""

import torch


def fit_linear_regression(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares ``y ≈ x @ weight.T + bias`` in float64 through the normal equations.

    x [N, D], y [N, T] → weight [T, D], bias [T]. Features are centred first; ``ridge`` (relative to the mean
    feature variance) keeps the solve stable when directions were removed (rank-deficient x).
    """
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(
            f"regression needs x [N, D] and y [N, T] with the same N, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    x, y = x.double(), y.double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc = x - x_mean
    gram = xc.T @ xc
    scale = gram.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    gram = gram + ridge * scale * torch.eye(x.shape[1], dtype=torch.float64)
    weight = torch.linalg.solve(gram, xc.T @ (y - y_mean)).T
    return weight, y_mean - weight @ x_mean


def predict(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.double() @ weight.T + bias


def mean_squared_error(prediction: torch.Tensor, target: torch.Tensor) -> float:
    return float(((prediction.double() - target.double()) ** 2).mean())


def r2_scores(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Coefficient of determination per output column: 1 − Σ(y − ŷ)² / Σ(y − ȳ)² (ȳ: mean of the targets given)."""
    target, prediction = target.double(), prediction.double()
    residual = ((target - prediction) ** 2).sum(0)
    total = ((target - target.mean(0)) ** 2).sum(0)
    if bool((total == 0).any()):
        raise ValueError("R² is undefined for a constant target column; evaluate on more than one position")
    return 1.0 - residual / total


def total_variance(x: torch.Tensor) -> float:
    """Sum of the per-dimension variances of x [N, D] (the trace of its covariance)."""
    x = x.double()
    return float(((x - x.mean(0)) ** 2).sum() / max(len(x) - 1, 1))
