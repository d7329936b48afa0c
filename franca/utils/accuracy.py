"""Top-k accuracy of class scores: the evaluation commands' and the trainer's k-NN monitor's one definition."""

import torch


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, topk: int = 1) -> float:
    """Share of samples whose label is among the ``topk`` largest logits, in percent.

    Ties are broken by ``torch.topk`` (lowest index first), so a constant row counts class 0 as predicted.
    """
    if logits.ndim != 2 or len(logits) != len(labels):
        raise ValueError(f"logits must be [N, C] with N = len(labels) = {len(labels)}, got {tuple(logits.shape)}")
    if len(labels) == 0:
        raise ValueError("top-k accuracy of an empty set is undefined: no labels given")
    topk = min(topk, logits.shape[1])
    hits = (logits.topk(topk, dim=1).indices == labels.to(logits.device)[:, None]).any(dim=1)
    return 100.0 * hits.double().mean().item()
