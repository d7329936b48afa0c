"""Franca's losses: Sinkhorn-Knopp and softmax-centred teacher targets, DINO (CLS), iBOT (patches) and KoLeo."""

from franca.loss.centering import SoftmaxCentering
from franca.loss.dino_clstoken import DINOLoss, dino_cross_entropy
from franca.loss.ibot_patch import IBOTPatchLoss
from franca.loss.koleo import koleo_loss
from franca.loss.sinkhorn import sinkhorn_knopp, sinkhorn_knopp_levels

__all__ = [
    "DINOLoss",
    "IBOTPatchLoss",
    "SoftmaxCentering",
    "dino_cross_entropy",
    "koleo_loss",
    "sinkhorn_knopp",
    "sinkhorn_knopp_levels",
]
