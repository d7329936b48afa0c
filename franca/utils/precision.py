"""The dtype the precision-sensitive parts compute in: fp32 for fp32 / bf16 / fp16 inputs, float64 kept as it is.

The losses and Sinkhorn-Knopp run with autocast off in fp32 (reference precision of the original DINOv2 losses), and
the ViT resizes its position grid in fp32. float64 inputs stay float64, so the float64 tests
(tests/test_loss_assembly.py) check the formulas to ~1e-10 rather than to fp32 rounding, and a
``compute_precision.dtype=fp64`` run (the golden test) is float64 from end to end.
"""

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32, or unchanged when it is float64."""
    return x if x.dtype == torch.float64 else x.float()
