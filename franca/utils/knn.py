"""Weighted k-NN classification on frozen features: the DINO protocol (Caron et al. 2021), shared by the k-NN
evaluation command (:mod:`franca.eval.knn`) and the trainer's periodic k-NN (:mod:`franca.train.knn_monitor`).

Features are L2-normalised; each test sample takes its k most cosine-similar training samples, weights each by
exp(similarity / T) and sums the weights per class; the class with the largest vote wins.
"""

import torch
import torch.nn.functional as F

from franca.utils.accuracy import topk_accuracy
from franca.utils.features import default_device

DEFAULT_KS = (10, 20, 100, 200)


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    ks: tuple[int, ...] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    device: torch.device | None = None,
) -> dict[int, torch.Tensor]:
    """Class votes [N_test, C] (on CPU) for each k: exp(cos/T)-weighted over the k nearest training samples.

    Similarities are computed ``chunk_size`` test rows at a time on ``device`` (default: CUDA when available); a k
    larger than the training set uses every training sample.
    """
    if len(train_features) == 0:
        raise ValueError("k-NN needs at least one training feature")
    device = device or default_device()
    num_classes = num_classes or int(train_labels.max()) + 1
    train = F.normalize(train_features.to(device, torch.float32), dim=1)
    labels = train_labels.to(device)
    kmax = min(max(ks), len(train))
    votes = {k: [] for k in ks}
    for start in range(0, len(test_features), chunk_size):
        test = F.normalize(test_features[start : start + chunk_size].to(device, torch.float32), dim=1)
        sims, idx = (test @ train.T).topk(kmax, dim=1)
        weights = (sims / temperature).exp()
        neighbour_labels = labels[idx]
        for k in ks:
            kk = min(k, kmax)
            v = torch.zeros(len(idx), num_classes, device=device)
            v.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            votes[k].append(v.cpu())
    return {k: torch.cat(v) for k, v in votes.items()}


def knn_accuracies(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: tuple[int, ...] = DEFAULT_KS,
    temperature: float = 0.07,
    device: torch.device | None = None,
) -> dict[str, dict[str, float]]:
    """``{str(k): {"top1": %, "top5": %}}`` of the weighted vote for each k (ties go to the lowest class index)."""
    if len(test_labels) == 0:
        raise ValueError("k-NN accuracy of an empty test set is undefined: no test labels given")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    votes = knn_classify(train_features, train_labels, test_features, ks, temperature, num_classes, device=device)
    labels = test_labels.cpu()
    return {
        f"{k}": {"top1": topk_accuracy(v, labels, 1), "top5": topk_accuracy(v, labels, 5)} for k, v in votes.items()
    }
