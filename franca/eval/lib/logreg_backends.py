"""L2-regularised multinomial logistic regression, three interchangeable solvers.

The solvers of the logistic-regression protocol (valeoai/Franca ``franca/eval/log_regression.py``, which fits cuML
only; docs/evaluation.md, "Logistic regression").

All solve  min_{W,b}  Σ_i CE(W x_i + b, y_i) + ‖W‖² / (2C)  (intercept not penalised, scikit-learn's objective):
- ``cuml``: cuML's GPU quasi-Newton solver with the original's settings (tol 1e-12, 50 line-search steps);
- ``sklearn``: scikit-learn's L-BFGS;
- ``torch``: L-BFGS with strong-Wolfe line search in float64 on the default device (GPU when present), loss
  accumulated over row chunks so large feature sets fit.
``auto`` = ``cuml`` when installed, else ``torch``. ``sklearn`` and ``torch`` can start a fit from a previous solution
(``init``, the warm start along the C path); every fit takes an optional gradient tolerance ``tol`` overriding the
backend's own. Every backend returns a :class:`LinearModel` (with ``converged`` False when a fit stopped at its
iteration limit; scikit-learn's ``ConvergenceWarning`` is turned into that flag, so a search reports it once);
predictions are made from it the same way for all.
With two classes scikit-learn and cuML fit one logit (w = w₁ − w₀) while ``torch`` fits two; the torch optimum then
equals theirs at 2C.
"""

import importlib.util
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from franca.utils.features import default_device

BACKENDS = ("auto", "cuml", "sklearn", "torch")


@dataclass
class LinearModel:
    """Logits = features @ weight.T + bias; weight [K, D] and bias [K] in float64 on the CPU. ``converged`` is False
    when the solver stopped at its iteration limit before reaching its tolerance."""

    weight: torch.Tensor
    bias: torch.Tensor
    converged: bool = True

    def logits(self, features: torch.Tensor, chunk_size: int = 65536) -> torch.Tensor:
        return torch.cat(
            [f.double() @ self.weight.T + self.bias for f in features.split(chunk_size)]
            if len(features)
            else [torch.empty(0, len(self.bias), dtype=torch.float64)]
        )


def _from_estimator(coef: np.ndarray, intercept: np.ndarray, classes: np.ndarray, num_classes: int) -> LinearModel:
    """Full [K, D] model from an estimator trained on the classes it saw; absent classes get logit −inf."""
    coef = torch.as_tensor(np.asarray(coef), dtype=torch.float64)
    intercept = torch.as_tensor(np.asarray(intercept), dtype=torch.float64).flatten()
    classes = torch.as_tensor(np.asarray(classes), dtype=torch.long)
    if len(coef) == 1:
        coef = torch.cat([torch.zeros_like(coef), coef])
        intercept = torch.cat([torch.zeros(1, dtype=torch.float64), intercept])
    weight = torch.zeros(num_classes, coef.shape[1], dtype=torch.float64)
    bias = torch.full((num_classes,), float("-inf"), dtype=torch.float64)
    weight[classes], bias[classes] = coef, intercept
    return LinearModel(weight, bias)


def _to_estimator(init: LinearModel, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coef_, intercept_) of a scikit-learn estimator over ``classes`` starting at ``init`` (inverse of
    :func:`_from_estimator`); a class ``init`` never saw (bias −inf) starts at 0."""
    weight = init.weight[torch.as_tensor(classes, dtype=torch.long)]
    bias = torch.nan_to_num(init.bias[torch.as_tensor(classes, dtype=torch.long)], neginf=0.0)
    if len(classes) == 2:
        weight, bias = (weight[1] - weight[0])[None], (bias[1] - bias[0])[None]
    return weight.numpy().copy(), bias.numpy().copy()


class SklearnBackend:
    name = "sklearn"
    warm_start = True

    def __init__(self, max_iter: int = 1000, tol: float = 1e-7):
        self.max_iter, self.tol = max_iter, tol

    def fit(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        C: float,
        num_classes: int,
        init: LinearModel | None = None,
        tol: float | None = None,
    ) -> LinearModel:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        y = labels.numpy()
        model = LogisticRegression(
            C=C, max_iter=self.max_iter, tol=self.tol if tol is None else tol, warm_start=init is not None
        )
        if init is not None:
            model.coef_, model.intercept_ = _to_estimator(init, np.unique(y))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(features.double().numpy(), y)
        stopped = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
        for other in (w for w in caught if not issubclass(w.category, ConvergenceWarning)):
            warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)
        fitted = _from_estimator(model.coef_, model.intercept_, model.classes_, num_classes)
        fitted.converged = not stopped  # reported once per search (log_regression), not as a warning per fit
        return fitted


class CumlBackend:
    name = "cuml"
    warm_start = False

    def __init__(self, max_iter: int = 1000, tol: float = 1e-12):
        self.max_iter, self.tol = max_iter, tol

    def fit(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        C: float,
        num_classes: int,
        init: LinearModel | None = None,
        tol: float | None = None,
    ) -> LinearModel:
        """``init`` is ignored: cuML's solver always starts from zero."""
        from cuml.linear_model import LogisticRegression

        model = LogisticRegression(
            penalty="l2",
            C=C,
            tol=self.tol if tol is None else tol,
            max_iter=self.max_iter,
            linesearch_max_iter=50,
            output_type="numpy",
        )
        model.fit(features.double().numpy(), labels.numpy())
        return _from_estimator(model.coef_, model.intercept_, model.classes_, num_classes)


class TorchBackend:
    """Multinomial L-BFGS; the objective is divided by N (same minimiser) so the gradient tolerance is scale-free."""

    name = "torch"
    warm_start = True

    def __init__(
        self,
        max_iter: int = 1000,
        tol: float = 1e-7,
        device: torch.device | None = None,
        chunk_size: int = 65536,
    ):
        self.max_iter, self.tol = max_iter, tol
        self.device = device or default_device()
        self.chunk_size = chunk_size

    def fit(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        C: float,
        num_classes: int,
        init: LinearModel | None = None,
        tol: float | None = None,
    ) -> LinearModel:
        if C <= 0:
            raise ValueError(f"C={C} must be > 0 (the inverse of the L2 regularisation strength)")
        x = features.to(self.device, torch.float64)
        y = labels.to(self.device)
        n, dim = x.shape
        weight = torch.zeros(num_classes, dim, dtype=torch.float64, device=self.device)
        bias = torch.zeros(num_classes, dtype=torch.float64, device=self.device)
        if init is not None:
            weight.copy_(init.weight)
            bias.copy_(torch.nan_to_num(init.bias, neginf=0.0))
        weight.requires_grad_(True)
        bias.requires_grad_(True)
        optimizer = torch.optim.LBFGS(
            [weight, bias],
            lr=1.0,
            max_iter=self.max_iter,
            max_eval=2 * self.max_iter,
            tolerance_grad=self.tol if tol is None else tol,
            tolerance_change=1e-15,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure() -> float:
            optimizer.zero_grad()
            total = 0.0
            for xs, ys in zip(x.split(self.chunk_size), y.split(self.chunk_size)):
                loss = F.cross_entropy(xs @ weight.T + bias, ys, reduction="sum") / n
                loss.backward()
                total += loss.item()
            penalty = weight.square().sum() / (2 * C * n)
            penalty.backward()
            return total + penalty.item()

        optimizer.step(closure)
        state = optimizer.state[optimizer._params[0]]
        converged = state.get("n_iter", 0) < self.max_iter and state.get("func_evals", 0) < 2 * self.max_iter
        return LinearModel(weight.detach().cpu(), bias.detach().cpu(), converged)


def make_backend(name: str, max_iter: int = 1000) -> SklearnBackend | CumlBackend | TorchBackend:
    """``auto`` picks cuML when importable (the original's GPU solver), else torch: on a CPU its search ran 4.8x
    faster than scikit-learn's on the same real features, to a val accuracy within a point (benchmarks/RESULTS.md,
    "Reading results (issue #26)"), and it uses a GPU when there is one. The choice is printed."""
    if name not in BACKENDS:
        raise ValueError(f"unknown logistic-regression backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        name = "cuml" if importlib.util.find_spec("cuml") else "torch"
        print(f"logistic regression backend: {name} (auto: cuML when installed, else torch)", flush=True)
    elif name in ("cuml", "sklearn") and importlib.util.find_spec(name) is None:
        extra = "RAPIDS cuML (https://docs.rapids.ai/install)" if name == "cuml" else "pip install scikit-learn"
        raise ImportError(f"--backend {name} needs the {name} package: install it ({extra}) or use --backend torch")
    return {"cuml": CumlBackend, "sklearn": SklearnBackend, "torch": TorchBackend}[name](max_iter=max_iter)
