"""The dtype the losses compute in: fp32 for fp32 / bf16 / fp16 inputs, float64 kept as it is.

The losses run with autocast off in fp32 (reference precision of the original DINOv2 losses); float64 inputs stay
float64 so the float64 tests (tests/test_loss_assembly.py) check the formulas to ~1e-10 rather than to fp32 rounding.
"""

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32, or unchanged when it is float64."""
    return x if x.dtype == torch.float64 else x.float()
