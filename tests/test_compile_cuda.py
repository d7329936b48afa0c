"""Per-block ``torch.compile`` (``franca.train.parallel.apply_compile``) against eager on CUDA: one full Franca step.

Compilation must not change what is computed: the same losses and student gradients as the eager step on the same
model and batch, up to the rounding of reordered and fused reductions. Parameters with tiny, cancelling gradients (the
MLP half of a block behind LayerScale 1e-5) show the largest relative differences: measured on CPU in fp32, the losses
are bit-identical, the whole gradient differs by ~1e-7 relative and single parameters by up to ~1e-3.
"""

import copy

import pytest
import torch
from helpers import MODEL_OVERRIDES, TINY_STEP, make_batch, relative_error, student_gradients, with_mask_lists

from franca.train.config import load_config
from franca.train.parallel import apply_compile
from franca.train.runtime import Runtime
from franca.train.ssl_meta_arch import SSLMetaArch


@pytest.mark.cuda
@pytest.mark.parametrize("chunked", ["false", "true"])
@pytest.mark.parametrize(
    "dtype, loss_tolerance, gradient_tolerance, parameter_tolerance",
    [("fp32", 1e-5, 1e-5, 1e-2), ("bf16", 3e-2, 3e-2, 1e-1)],
)
def test_compiled_blocks_give_the_eager_step_on_cuda(
    dtype, loss_tolerance, gradient_tolerance, parameter_tolerance, chunked
):
    device = torch.device("cuda")
    torch.manual_seed(0)
    precision = [f"compute_precision.chunked_losses={chunked}", f"compute_precision.dtype={dtype}"]
    cfg = load_config(None, TINY_STEP + MODEL_OVERRIDES + precision)
    runtime = Runtime.resolve(cfg, device)
    eager = SSLMetaArch(cfg).to(device)
    compiled = copy.deepcopy(eager)
    for models in (compiled.student, compiled.teacher):
        apply_compile(models["backbone"].blocks)
    batch = with_mask_lists(make_batch(torch.Generator().manual_seed(1)))
    batch = {k: v.to(device) for k, v in batch.items()}
    results = [
        (model.forward_backward(batch, teacher_temp=0.05, runtime=runtime), student_gradients(model))
        for model in (eager, compiled)
    ]
    (eager_losses, eager_grads), (losses, grads) = results
    assert losses.keys() == eager_losses.keys() and "ibot_loss" in losses
    for key, value in eager_losses.items():
        torch.testing.assert_close(losses[key], value, rtol=loss_tolerance, atol=0, msg=key)
    assert grads.keys() == eager_grads.keys()
    whole = relative_error(
        torch.cat([g.flatten() for g in grads.values()]), torch.cat([g.flatten() for g in eager_grads.values()])
    )
    assert whole < gradient_tolerance
    for name, grad in eager_grads.items():
        assert relative_error(grads[name], grad) < parameter_tolerance, name
