"""k-means, PCA and Hungarian-matched mIoU for unsupervised segmentation (valeoai/Franca
``rasa/experiments/utils.py``, used by the validation of ``rasa/src/rasa.py``).

k-means runs on faiss when it is installed (the original's ``faiss.Kmeans``), else on an equivalent torch
implementation (Lloyd iterations from k-means++ seeds); the choice is logged. Both fit on at most
``max_points_per_centroid · k`` randomly drawn points, as faiss does by default, keep the best of ``n_redo`` runs by
inertia, and assign points in chunks.
"""

import importlib.util
import logging

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

logger = logging.getLogger(__name__)


def kmeans_backend() -> str:
    return "faiss" if importlib.util.find_spec("faiss") is not None else "torch"


def _subsample(x: torch.Tensor, limit: int, generator: torch.Generator) -> torch.Tensor:
    if len(x) <= limit:
        return x
    return x[torch.randperm(len(x), generator=generator)[:limit]]


def assign_clusters(x: torch.Tensor, centroids: torch.Tensor, chunk_size: int = 65536) -> torch.Tensor:
    """Index of the nearest centroid (squared Euclidean distance) for each row of x [N, D]."""
    labels = []
    c = centroids.float()
    c_sq = (c * c).sum(1)
    for chunk in x.float().split(chunk_size):
        labels.append((c_sq[None, :] - 2 * chunk @ c.T).argmin(1))
    return torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)


def _plus_plus_seeds(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    centroids = [x[torch.randint(len(x), (1,), generator=generator)].squeeze(0)]
    nearest = ((x - centroids[0]) ** 2).sum(1)
    for _ in range(1, k):
        probabilities = nearest / nearest.sum() if nearest.sum() > 0 else torch.full_like(nearest, 1 / len(x))
        chosen = x[torch.multinomial(probabilities, 1, generator=generator)].squeeze(0)
        centroids.append(chosen)
        nearest = torch.minimum(nearest, ((x - chosen) ** 2).sum(1))
    return torch.stack(centroids)


def _torch_kmeans(x: torch.Tensor, k: int, n_iter: int, n_redo: int, generator: torch.Generator) -> torch.Tensor:
    best, best_inertia = None, float("inf")
    for _ in range(n_redo):
        centroids = _plus_plus_seeds(x, k, generator)
        for _ in range(n_iter):
            labels = assign_clusters(x, centroids)
            sums = torch.zeros_like(centroids).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=k).to(x.dtype)
            empty = counts == 0
            centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1)[:, None])
        inertia = float(((x - centroids[assign_clusters(x, centroids)]) ** 2).sum())
        if inertia < best_inertia:
            best, best_inertia = centroids, inertia
    return best


def _faiss_kmeans(x: torch.Tensor, k: int, n_iter: int, n_redo: int, seed: int) -> torch.Tensor:
    import faiss

    kmeans = faiss.Kmeans(x.shape[1], k, niter=n_iter, nredo=n_redo, seed=seed, max_points_per_centroid=10**9)
    kmeans.train(np.ascontiguousarray(x.numpy(), dtype=np.float32))
    return torch.from_numpy(kmeans.centroids.copy())


def kmeans(
    x: torch.Tensor,
    k: int,
    n_iter: int = 50,
    n_redo: int = 5,
    seed: int = 1,
    max_points_per_centroid: int = 256,
    backend: str | None = None,
) -> torch.Tensor:
    """Centroids [k, D] of x [N, D] (the original's settings: 50 iterations, 5 restarts, seed 1)."""
    if len(x) < k:
        raise ValueError(f"k-means with k={k} needs at least {k} points, got {len(x)}")
    backend = backend or kmeans_backend()
    if backend not in ("faiss", "torch"):
        raise ValueError(f"k-means backend={backend!r} is unknown; choose 'faiss' or 'torch'")
    generator = torch.Generator().manual_seed(seed)
    sample = _subsample(x.float(), max_points_per_centroid * k, generator)
    logger.info("k-means (%s): k=%d on %d of %d points", backend, k, len(sample), len(x))
    if backend == "faiss":
        return _faiss_kmeans(sample, k, n_iter, n_redo, seed)
    return _torch_kmeans(sample, k, n_iter, n_redo, generator)


def pca_projection(x: torch.Tensor, n_components: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], components [n, D]) of the top ``n_components`` principal directions of x [N, D] (float64 eigh)."""
    x = x.double()
    mean = x.mean(0)
    covariance = (x - mean).T @ (x - mean) / max(len(x) - 1, 1)
    _, vectors = torch.linalg.eigh(covariance)
    n_components = min(n_components, x.shape[1])
    return mean.float(), vectors[:, -n_components:].flip(1).T.float()


def confusion_matrix(clusters: torch.Tensor, labels: torch.Tensor, k: int, num_classes: int, ignore_index: int):
    """[k, num_classes] counts of (cluster, ground-truth class) pairs, pixels labelled ``ignore_index`` left out."""
    keep = labels != ignore_index
    if bool((labels[keep] >= num_classes).any()) or bool((labels[keep] < 0).any()):
        raise ValueError(f"mask labels must lie in [0, {num_classes}) or equal {ignore_index}")
    flat = clusters[keep].long() * num_classes + labels[keep].long()
    return torch.bincount(flat, minlength=k * num_classes).reshape(k, num_classes)


def hungarian_match(confusion: torch.Tensor) -> np.ndarray:
    """For each cluster the class it is matched to (one-to-one, maximising matched pixels), or -1 if unmatched."""
    rows, cols = linear_sum_assignment(confusion.numpy(), maximize=True)
    mapping = np.full(confusion.shape[0], -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def matched_miou(confusion: torch.Tensor, mapping: np.ndarray) -> tuple[float, list[float]]:
    """mIoU (percent) after relabelling clusters by ``mapping``; classes absent from both prediction and ground truth
    are left out of the mean (their IoU is reported as NaN)."""
    num_classes = confusion.shape[1]
    class_confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    for cluster, cls in enumerate(mapping):
        if cls >= 0:
            class_confusion[cls] += confusion[cluster].double()
    true_positive = class_confusion.diagonal()
    predicted = class_confusion.sum(1)
    actual = confusion.double().sum(0)
    union = predicted + actual - true_positive
    iou = torch.where(union > 0, true_positive / union.clamp_min(1), torch.tensor(float("nan"), dtype=torch.float64))
    return 100.0 * float(iou[union > 0].mean()), (100.0 * iou).tolist()
