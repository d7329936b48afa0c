"""Chunked DINO / iBOT cross-entropies and the chunked meta-architecture path against the plain ones.

The plain losses are checked against brute-force float64 loops in test_losses.py; here the chunked forms must give
their values and their gradients (``torch.autograd.grad``) for any chunk size, including sizes that do not divide the
rows, with targets served by ``SinkhornTargets`` (streaming Sinkhorn-Knopp) or ``DenseTargets`` (softmax centering).
"""

import copy

import pytest
import torch
from helpers import MODEL_OVERRIDES, TINY_STEP, make_batch, relative_error, student_gradients, with_mask_lists

from franca.loss import (
    DenseTargets,
    DINOLoss,
    IBOTPatchLoss,
    chunked_dino_cross_entropy,
    chunked_token_cross_entropy,
    dino_cross_entropy,
    sinkhorn_knopp,
    sinkhorn_knopp_streaming,
)
from franca.train.config import load_config
from franca.train.health import reduce_stats
from franca.train.runtime import Runtime
from franca.train.ssl_meta_arch import SSLMetaArch

CHUNK_SIZES = [1, 2, 3, 64]  # 5 images and 11 tokens below: 2 and 3 do not divide them, 64 exceeds them


def value_and_grad(loss_fn, student):
    student = student.detach().requires_grad_()
    loss = loss_fn(student) * 3.5  # a non-unit upstream gradient reaches backward
    (grad,) = torch.autograd.grad(loss, student)
    return loss.detach(), grad


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "n_student_crops, n_teacher_crops, skip_same_view",
    [(2, 2, True), (4, 2, False), (3, 2, True), (1, 2, False), (2, 1, True), (1, 1, True)],
)
@pytest.mark.slow
def test_chunked_dino_equals_plain_in_value_and_gradient(
    n_student_crops, n_teacher_crops, skip_same_view, dtype, chunk_size
):
    generator = torch.Generator().manual_seed(n_student_crops + 10 * chunk_size)
    batch, n_prototypes = 5, 24
    student = (torch.randn(n_student_crops * batch, n_prototypes, generator=generator) * 2).to(dtype)
    teacher_logits = torch.randn(n_teacher_crops * batch, n_prototypes, generator=generator).to(dtype)
    args = (0.1, n_student_crops, n_teacher_crops, skip_same_view)
    plain_targets = sinkhorn_knopp(teacher_logits, 0.05)
    expected = value_and_grad(lambda s: dino_cross_entropy(s, plain_targets, *args), student)
    for targets in (
        sinkhorn_knopp_streaming(teacher_logits, 0.05, chunk_size=chunk_size),
        DenseTargets(plain_targets, chunk_size),
    ):
        loss, grad = value_and_grad(lambda s, t=targets: chunked_dino_cross_entropy(s, t, *args), student)
        assert loss.dtype == torch.float32 and grad.dtype == dtype
        torch.testing.assert_close(loss, expected[0], rtol=1e-6, atol=0)
        tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-4}
        torch.testing.assert_close(grad, expected[1], **tolerance)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_chunked_ibot_equals_plain_in_value_and_gradient(chunk_size):
    generator = torch.Generator().manual_seed(chunk_size)
    n_masked, out_dims, weights = 11, (6, 12), [1.0, 0.5]
    masks_weight = torch.tensor([1 / 4] * 4 + [1 / 7] * 7)
    students = [torch.randn(n_masked, k, generator=generator) * 2 for k in out_dims]
    teacher_logits = [torch.randn(n_masked, k, generator=generator) for k in out_dims]
    loss_fn = IBOTPatchLoss(student_temp=0.1, level_weights=weights)
    plain_targets = [sinkhorn_knopp(t, 0.05) for t in teacher_logits]
    chunked_targets = [sinkhorn_knopp_streaming(t, 0.05, chunk_size=chunk_size) for t in teacher_logits]
    for level in range(len(out_dims)):

        def loss_with(targets, level=level):
            def loss(s):
                levels = [s if i == level else x for i, x in enumerate(students)]
                return loss_fn(levels, targets, masks_weight, n_global_images=4)

            return loss

        expected = value_and_grad(loss_with(plain_targets), students[level])
        got = value_and_grad(loss_with(chunked_targets), students[level])
        torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=0)
        torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-7)


def test_chunked_ibot_without_masked_tokens_is_zero():
    student = torch.zeros(0, 8, requires_grad=True)
    targets = sinkhorn_knopp_streaming(torch.zeros(0, 8), 0.05, chunk_size=4)
    loss = chunked_token_cross_entropy(student, targets, torch.zeros(0), student_temp=0.1)
    (grad,) = torch.autograd.grad(loss, student)
    assert loss.item() == 0.0 and grad.shape == (0, 8)


def test_dino_loss_dispatches_each_level_on_its_targets():
    generator = torch.Generator().manual_seed(3)
    students = [torch.randn(8, k, generator=generator) for k in (4, 8)]
    teachers = [torch.randn(4, k, generator=generator) for k in (4, 8)]
    loss = DINOLoss(student_temp=0.1, level_weights=[1.0, 2.0])
    plain = loss(students, [sinkhorn_knopp(t, 0.05) for t in teachers], 4, 2)
    chunked = loss(students, [sinkhorn_knopp_streaming(t, 0.05, chunk_size=1) for t in teachers], 4, 2)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=0)


def test_chunked_losses_run_in_fp32_under_autocast():
    generator = torch.Generator().manual_seed(4)
    student = torch.randn(4, 6, generator=generator).requires_grad_()
    targets = sinkhorn_knopp_streaming(torch.randn(4, 6, generator=generator).bfloat16(), 0.05, chunk_size=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_dino_cross_entropy(student, targets, 0.1, 2, 2, skip_same_view=True)
        loss.backward()
    assert loss.dtype == torch.float32 and student.grad.dtype == torch.float32


def test_chunked_dino_names_a_shape_mismatch():
    targets = sinkhorn_knopp_streaming(torch.zeros(6, 4), 0.05, chunk_size=2)
    with pytest.raises(ValueError, match="share the images per crop"):
        chunked_dino_cross_entropy(torch.zeros(4, 4), targets, 0.1, 2, 2)


def plain_and_chunked_steps(overrides: list[str], device: torch.device, dtype: str = "fp32"):
    """Losses and student gradients of one ``forward_backward`` of the same model and batch, plain then chunked."""
    torch.manual_seed(0)
    dtype_override = f"compute_precision.dtype={dtype}"
    cfgs = [
        load_config(None, TINY_STEP + overrides + [dtype_override, f"compute_precision.chunked_losses={chunked}"])
        for chunked in ("false", "true")
    ]
    plain = SSLMetaArch(cfgs[0]).to(device)
    chunked = copy.deepcopy(plain)
    batch = with_mask_lists(make_batch(torch.Generator().manual_seed(1)))
    batch = {k: v.to(device) for k, v in batch.items()}
    results = []
    for model, cfg in zip((plain, chunked), cfgs, strict=True):
        stats = {}
        losses = model.forward_backward(batch, teacher_temp=0.05, runtime=Runtime.resolve(cfg, device), stats=stats)
        results.append((losses, student_gradients(model), reduce_stats(stats)))
    return results


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "centering"])
@pytest.mark.slow
def test_meta_arch_chunked_path_equals_plain_on_cpu(centering):
    (plain_losses, plain_grads, plain_stats), (losses, grads, stats) = plain_and_chunked_steps(
        MODEL_OVERRIDES + [f"train.centering={centering}"], torch.device("cpu")
    )
    assert stats == pytest.approx(plain_stats, rel=1e-5) and "ibot_target_entropy_l4" in stats
    assert losses.keys() == plain_losses.keys() and "ibot_loss" in losses
    for key, value in plain_losses.items():
        torch.testing.assert_close(losses[key], value, rtol=1e-5, atol=0, msg=key)
    assert grads.keys() == plain_grads.keys()
    # fp32 rounding of the loss gradients reaches the backbone through 2 blocks: ~1e-6 relative, 3.3e-5 at most (the
    # first block's small, cancelling norm bias gradients, with the default fan-in head init); a wrong chunk or target
    # row would be off by O(1).
    for name, grad in plain_grads.items():
        assert relative_error(grads[name], grad) < 1e-4, name


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, tolerance", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_meta_arch_chunked_path_equals_plain_on_cuda(dtype, tolerance):
    (plain_losses, plain_grads, _), (losses, grads, _) = plain_and_chunked_steps(
        MODEL_OVERRIDES, torch.device("cuda"), dtype
    )
    for key, value in plain_losses.items():
        torch.testing.assert_close(losses[key], value, rtol=tolerance, atol=0, msg=key)
    for name, grad in plain_grads.items():
        assert relative_error(grads[name], grad) < tolerance, name


@pytest.mark.cuda
def test_training_step_has_no_host_sync_on_cuda():
    """forward_backward, clipping, fused AdamW and the EMA update run without a device-to-host synchronisation."""
    from franca.train.build import build_optimizer

    device = torch.device("cuda")
    torch.manual_seed(0)
    cfg = load_config(None, TINY_STEP + MODEL_OVERRIDES + ["compute_precision.chunked_losses=true"])
    runtime = Runtime.resolve(cfg, device)  # auto: bf16 autocast on CUDA
    model = SSLMetaArch(cfg).to(device)
    optimizer = build_optimizer(cfg, model, device)
    batch = {k: v.to(device) for k, v in with_mask_lists(make_batch(torch.Generator().manual_seed(1))).items()}

    def step():
        optimizer.zero_grad(set_to_none=True)
        model.forward_backward(batch, teacher_temp=0.05, runtime=runtime)
        model.clip_gradients(3.0)
        optimizer.step()
        model.update_teacher(0.99)

    step()  # first-call set-up (allocator, kernels, optimizer state) may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
