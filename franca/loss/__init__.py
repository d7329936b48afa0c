"""Franca's losses: Sinkhorn-Knopp and softmax-centred teacher targets, DINO (CLS), iBOT (patches) and KoLeo.

The ``chunked_*`` / ``*_streaming`` variants compute the same values without [tokens × K] fp32 tensors (``chunked``).
"""

from franca.loss.centering import SoftmaxCentering
from franca.loss.chunked import DenseTargets, TargetRows, target_rows
from franca.loss.dino_clstoken import DINOLoss, chunked_dino_cross_entropy, dino_cross_entropy
from franca.loss.ibot_patch import IBOTPatchLoss, chunked_token_cross_entropy
from franca.loss.koleo import koleo_loss
from franca.loss.sinkhorn import SinkhornTargets, sinkhorn_knopp, sinkhorn_knopp_streaming

__all__ = [
    "DINOLoss",
    "DenseTargets",
    "IBOTPatchLoss",
    "SinkhornTargets",
    "SoftmaxCentering",
    "TargetRows",
    "chunked_dino_cross_entropy",
    "chunked_token_cross_entropy",
    "dino_cross_entropy",
    "koleo_loss",
    "sinkhorn_knopp",
    "sinkhorn_knopp_streaming",
    "target_rows",
]
