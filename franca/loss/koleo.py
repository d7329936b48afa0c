"""KoLeo regulariser (Sablayrolles et al. 2019) on the backbone CLS features of one global view (valeoai/Franca
``franca/loss/koleo_loss.py``).

KoLeo(X) = −mean_i log(‖x̂_i − x̂_nn(i)‖₂ + eps), x̂ the L2-normalised rows and nn(i) the other row of largest cosine
similarity. It spreads the features of a batch uniformly over the sphere. Computed in fp32 with autocast off.
"""

import torch
import torch.nn.functional as F

from franca.utils.precision import at_least_fp32


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo of x [n, D] with n ≥ 2; the distance is ``F.pairwise_distance(..., eps=eps)`` as in DINOv2."""
    if x.ndim != 2:
        raise ValueError(f"koleo_loss expects features of shape [n, D], got {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(
            f"KoLeo needs >= 2 samples per global view per rank, got {x.shape[0]}; raise the per-rank batch size "
            "or set dino.koleo_loss_weight=0"
        )
    with torch.autocast(device_type=x.device.type, enabled=False):
        unit = F.normalize(at_least_fp32(x), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            cosine = unit @ unit.T
            cosine.fill_diagonal_(float("-inf"))
            nearest = cosine.argmax(dim=1)
        distances = F.pairwise_distance(unit, unit[nearest], p=2, eps=eps)
        return -(distances + eps).log().mean()
