"""Out-of-distribution metrics of the evaluation commands: AUROC and FPR at 95% TPR (top-k accuracy is
:func:`franca.utils.accuracy.topk_accuracy`).

Out-of-distribution convention (Hendrycks & Gimpel 2017; Sun et al. 2022): in-distribution samples are the
positives and a larger score means "more in-distribution".
"""

import math

import torch


def _check_scores(scores_in: torch.Tensor, scores_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores_in, scores_out = torch.as_tensor(scores_in).flatten(), torch.as_tensor(scores_out).flatten()
    if len(scores_in) == 0 or len(scores_out) == 0:
        raise ValueError(
            f"AUROC / FPR need both in-distribution and out-of-distribution scores, got {len(scores_in)} and "
            f"{len(scores_out)}"
        )
    for name, s in (("in-distribution", scores_in), ("out-of-distribution", scores_out)):
        if not torch.isfinite(s).all():
            raise ValueError(f"{name} scores contain NaN or infinite values; check the features and the score")
    return scores_in.double().cpu(), scores_out.double().cpu()


def auroc(scores_in: torch.Tensor, scores_out: torch.Tensor) -> float:
    """Area under the ROC curve: P(score_in > score_out) + ½·P(score_in = score_out).

    Rank form of the Mann–Whitney U statistic: with average ranks r (ties share the mean of their ranks),
    AUROC = (Σ r_in − n_in(n_in+1)/2) / (n_in·n_out).
    """
    scores_in, scores_out = _check_scores(scores_in, scores_out)
    n_in, n_out = len(scores_in), len(scores_out)
    values, inverse, counts = torch.unique(torch.cat([scores_in, scores_out]), return_inverse=True, return_counts=True)
    ranks_below = torch.cumsum(counts, 0) - counts
    average_rank = ranks_below.double() + (counts.double() + 1) / 2
    rank_sum_in = average_rank[inverse[:n_in]].sum().item()
    return (rank_sum_in - n_in * (n_in + 1) / 2) / (n_in * n_out)


def fpr_at_tpr(scores_in: torch.Tensor, scores_out: torch.Tensor, tpr: float = 0.95) -> float:
    """False-positive rate at the largest threshold t whose true-positive rate P(score_in ≥ t) reaches ``tpr``.

    t is the ⌈tpr·n_in⌉-th largest in-distribution score; the FPR is P(score_out ≥ t) (the operating point of
    ``sklearn.metrics.roc_curve`` used by OpenOOD).
    """
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr={tpr} must be in (0, 1]")
    scores_in, scores_out = _check_scores(scores_in, scores_out)
    needed = math.ceil(tpr * len(scores_in) - 1e-9)
    threshold = scores_in.sort(descending=True).values[needed - 1]
    return (scores_out >= threshold).double().mean().item()


def ood_metrics(scores_in: torch.Tensor, scores_out: torch.Tensor) -> dict[str, float]:
    """AUROC and FPR@95%TPR, both in percent."""
    return {"auroc": 100.0 * auroc(scores_in, scores_out), "fpr95": 100.0 * fpr_at_tpr(scores_in, scores_out, 0.95)}
