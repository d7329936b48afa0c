"""Linear read-out of patch position from features: closed-form ridge regression, its strength chosen by grouped
cross-validation, MSE, R² and variance shares.

These measure how much absolute position a feature still encodes linearly, the quantity RASA removes (arXiv
2507.14137; docs/rasa.md, "Evaluate a head"). Everything is solved in float64 from the sufficient statistics
(sums of x, y, xxᵀ, xyᵀ), so the per-fold fits of the cross-validation cost one pass over the tokens.
"""

from typing import NamedTuple

import torch


class Moments(NamedTuple):
    """Sufficient statistics of (x [N, D], y [N, T]) pairs for least squares, in float64 (they add and subtract)."""

    count: int
    x_sum: torch.Tensor
    y_sum: torch.Tensor
    xx: torch.Tensor
    xy: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor, y: torch.Tensor) -> "Moments":
        if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
            raise ValueError(
                f"regression needs x [N, D] and y [N, T] with the same N, got {tuple(x.shape)}, {tuple(y.shape)}"
            )
        x, y = x.double(), y.double()
        return cls(len(x), x.sum(0), y.sum(0), x.T @ x, x.T @ y)

    def __sub__(self, other: "Moments") -> "Moments":
        return Moments(*(a - b for a, b in zip(self, other)))

    def centred(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(centred Gram Xcᵀ Xc [D, D], centred cross-product Xcᵀ Yc [D, T], mean of x, mean of y)."""
        x_mean, y_mean = self.x_sum / self.count, self.y_sum / self.count
        gram = self.xx - self.count * torch.outer(x_mean, x_mean)
        return gram, self.xy - self.count * torch.outer(x_mean, y_mean), x_mean, y_mean


def ridge_solutions(moments: Moments, ridges: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimisers of Σ‖y − x·Wᵀ − b‖² + λ‖W‖² (intercept b not penalised) for every λ in ``ridges``.

    W(λ) = (XcᵀXc + λI)⁻¹ XcᵀYc from one eigendecomposition of the centred Gram matrix; b = ȳ − W x̄.
    Returns weights [R, T, D] and biases [R, T].
    """
    gram, cross, x_mean, y_mean = moments.centred()
    values, vectors = torch.linalg.eigh(gram)
    rotated = vectors.T @ cross
    weights = torch.stack([(vectors @ (rotated / (values + ridge)[:, None])).T for ridge in ridges])
    return weights, y_mean - weights @ x_mean


def fit_ridge_regression(x: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression ``y ≈ x @ weight.T + bias`` in float64: x [N, D], y [N, T] → weight [T, D], bias [T].

    ``ridge`` is λ of Σ‖y − x·Wᵀ − b‖² + λ‖W‖² (absolute; 0 gives ordinary least squares on full-rank x).
    """
    weights, biases = ridge_solutions(Moments.of(x, y), [ridge])
    return weights[0], biases[0]


def mean_eigenvalue(moments: Moments) -> float:
    """tr(XcᵀXc)/D: the scale the relative ridge strengths multiply (a strength is unit-free this way)."""
    gram = moments.centred()[0]
    return float(gram.trace() / len(gram)) or torch.finfo(torch.float64).tiny


class RidgeFit(NamedTuple):
    weight: torch.Tensor  # [T, D]
    bias: torch.Tensor  # [T]
    relative_ridge: float  # the chosen strength α: λ = α · tr(XcᵀXc)/D
    validation_mse: list[float]  # per candidate α, over the held-out folds


def cross_validated_ridge(
    x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, relative_ridges: tuple[float, ...]
) -> RidgeFit:
    """Ridge regression whose strength is chosen by leave-one-group-out validation.

    ``groups`` [N] gives each row's fold (for position read-outs: one fold per set of whole images, so no image is
    both fitted and scored). For each fold the candidates λ = α · tr(XcᵀXc)/D are fitted on the other folds and
    scored by squared error on it; the α with the least total error is refitted on all rows.
    """
    folds = groups.unique()
    if len(folds) < 2:
        raise ValueError(f"cross-validation needs rows in at least 2 groups, got groups {folds.tolist()}")
    fold_moments = [Moments.of(x[groups == fold], y[groups == fold]) for fold in folds]
    total = Moments(*(sum(parts) for parts in zip(*fold_moments)))
    errors = torch.zeros(len(relative_ridges), dtype=torch.float64)
    for fold, moments in zip(folds, fold_moments):
        rest = total - moments
        scale = mean_eigenvalue(rest)
        weights, biases = ridge_solutions(rest, [alpha * scale for alpha in relative_ridges])
        prediction = x[groups == fold].double() @ weights.transpose(1, 2) + biases[:, None]
        errors += ((prediction - y[groups == fold].double()) ** 2).sum((1, 2))
    best = int(errors.argmin())
    weights, biases = ridge_solutions(total, [relative_ridges[best] * mean_eigenvalue(total)])
    validation_mse = (errors / (total.count * y.shape[1])).tolist()
    return RidgeFit(weights[0], biases[0], relative_ridges[best], validation_mse)


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
