"""PCA colours of patch features: foreground detection and the 3-component RGB map that :mod:`franca.eval.pca` draws
(its docstring gives the method) and that :mod:`franca.demo` shows."""

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_THRESHOLD = 0.35
FOREGROUND_METHODS = ("border", "pc1")


def principal_components(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and the top ``n`` principal directions [n, D] of rows ``x`` [M, D] (float64, exact SVD), each
    oriented so that its largest-magnitude loading is positive; fewer when rank(x) < n."""
    x = x.double()
    mean = x.mean(dim=0)
    _, singular_values, vh = torch.linalg.svd(x - mean, full_matrices=False)
    rank = int((singular_values > singular_values.max().clamp_min(1e-30) * 1e-10).sum()) if len(x) > 1 else 0
    components = vh[: min(n, rank)]
    largest = components.gather(1, components.abs().argmax(dim=1, keepdim=True))
    return mean, components * torch.where(largest < 0, -1.0, 1.0)


def minmax_scale(values: torch.Tensor) -> torch.Tensor:
    """Columns of ``values`` [M, K] scaled to [0, 1] over the rows (a constant column becomes 0)."""
    low, high = values.min(dim=0).values, values.max(dim=0).values
    return (values - low) / (high - low).clamp_min(1e-12)


def border_mask(n: int, h: int, w: int) -> torch.Tensor:
    """[n, h, w] True on the outermost patch rows and columns of every image."""
    mask = torch.zeros(n, h, w, dtype=torch.bool)
    mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1] = True, True, True, True
    return mask


def otsu_threshold(values: torch.Tensor) -> float:
    """The threshold t (midway between two sorted values) whose split {≤ t} / {> t} maximises the between-class
    variance w₀·w₁·(μ₀ − μ₁)² (Otsu 1979, on the values themselves rather than a histogram)."""
    ordered = values.reshape(-1).double().sort().values
    n = len(ordered)
    if n < 2 or ordered[-1] - ordered[0] <= 1e-12:
        return float(ordered[-1]) if n else 0.0
    below = torch.arange(1, n, dtype=torch.float64)
    sums = ordered.cumsum(0)[:-1]
    mean_low, mean_high = sums / below, (ordered.sum() - sums) / (n - below)
    between = below * (n - below) * (mean_low - mean_high) ** 2
    between[ordered[1:] == ordered[:-1]] = -1.0  # a split must fall between two different values
    k = int(between.argmax())
    return float((ordered[k] + ordered[k + 1]) / 2)


def border_distance(patch_features: torch.Tensor) -> torch.Tensor:
    """[N, h, w, D] → [N, h, w]: each patch's cosine distance to the median of its image's border patches."""
    n, h, w, d = patch_features.shape
    unit = F.normalize(patch_features.double(), dim=-1)
    border = border_mask(1, h, w)[0]
    background = F.normalize(unit[:, border].median(dim=1).values, dim=-1)
    return 1.0 - torch.einsum("nhwd,nd->nhw", unit, background)


def foreground_mask(
    patch_features: torch.Tensor, method: str = "border", threshold: float = DEFAULT_THRESHOLD
) -> torch.Tensor:
    """[N, h, w] bool: the foreground patches of an image set by ``method`` (module docstring, step 1)."""
    if method == "border":
        scores = border_distance(patch_features)
        return torch.stack([image > otsu_threshold(image) for image in scores])
    if method != "pc1":
        raise ValueError(f"foreground method {method!r} is unknown; choose one of {', '.join(FOREGROUND_METHODS)}")
    n, h, w, d = patch_features.shape
    x = patch_features.reshape(-1, d).double()
    mean, components = principal_components(x, 1)
    if not len(components):
        return torch.ones(n, h, w, dtype=torch.bool)
    first = (x - mean) @ components[0]
    if first[border_mask(n, h, w).reshape(-1)].mean() < first.mean():
        first = -first
    return (minmax_scale(first[:, None])[:, 0] <= threshold).reshape(n, h, w)


def pca_rgb(
    patch_features: torch.Tensor,
    threshold: float = DEFAULT_THRESHOLD,
    remove_background: bool = True,
    foreground: str = "border",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch features [N, h, w, D] of an image set → (RGB [N, h, w, 3] in [0, 1], foreground [N, h, w] bool).

    See the module docstring; ``threshold`` applies to the ``pc1`` foreground; without ``remove_background`` every
    patch is foreground.
    """
    n, h, w, d = patch_features.shape
    x = patch_features.reshape(-1, d).double()
    if remove_background:
        mask = foreground_mask(patch_features, foreground, threshold).reshape(-1)
    else:
        mask = torch.ones(len(x), dtype=torch.bool)
    rgb = torch.zeros(len(x), 3, dtype=torch.float64)
    if mask.sum() > 1:
        mean, components = principal_components(x[mask], 3)
        rgb[mask, : components.shape[0]] = minmax_scale((x[mask] - mean) @ components.T)
    return rgb.float().reshape(n, h, w, 3), mask.reshape(n, h, w)


def upsample_rgb(rgb: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """[N, h, w, 3] in [0, 1] → uint8 [N, H, W, 3] by bilinear upsampling."""
    up = F.interpolate(rgb.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
    return (up.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
