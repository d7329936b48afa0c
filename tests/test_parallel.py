"""parallelize() pieces: activation checkpointing alone, and FSDP2 / DDP on 2 gloo ranks against one process.

The distributed check: 2 ranks with half a batch each must give the single-process losses (averaged over ranks) and
gradients on the concatenated batch, the same clipped gradient norms, and the EMA teacher of the closed form
θ_t ← m·θ_t + (1−m)·θ_s computed in float64.
"""

import copy
import os
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp
from helpers import IMAGES, TINY_STEP, free_port, make_batch, with_mask_lists

from franca.models import build_vit
from franca.train.config import load_config
from franca.train.parallel import apply_activation_checkpointing, mixed_precision_policy
from franca.train.runtime import Runtime


def test_activation_checkpointing_keeps_outputs_gradients_and_names():
    torch.manual_seed(0)
    plain = build_vit("vit_tiny", depth=2, patch_size=8, img_size=32, embed_dim=32, num_heads=2, drop_path_rate=0.5)
    checkpointed = copy.deepcopy(plain)
    apply_activation_checkpointing(checkpointed.blocks)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in checkpointed.named_parameters()]
    x = torch.randn(4, 3, 32, 32)
    outputs = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # stochastic depth draws the same samples; the recomputation must replay them
        out = model(x, is_training=True)["x_norm_patchtokens"]
        (out.square().mean()).backward()
        outputs.append(out.detach())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)
    with pytest.raises(ValueError, match="already has activation checkpointing"):
        apply_activation_checkpointing(checkpointed.blocks)


def test_mixed_precision_policy():
    cfg = load_config(None, [])
    head = mixed_precision_policy(cfg.compute_precision.student.dino_head.mixed_precision)
    assert (head.param_dtype, head.reduce_dtype) == (torch.bfloat16, torch.float32)
    off = mixed_precision_policy(cfg.compute_precision.student.dino_head.mixed_precision, enabled=False)
    assert off.param_dtype is None and off.reduce_dtype is None


def rank_slice(batch: dict, rank: int, world_size: int) -> dict:
    """This rank's samples of every crop (rows are crop-major), with its own mask indices and weights."""
    per_rank = IMAGES // world_size
    rows = [c * IMAGES + rank * per_rank + i for c in range(2) for i in range(per_rank)]
    part = {key: value[rows] for key, value in batch.items()}
    return with_mask_lists(part)


def full_grad(p: torch.Tensor) -> torch.Tensor | None:
    from torch.distributed.tensor import DTensor

    if p.grad is None:
        return None
    return p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad


def full_param(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return p.full_tensor() if isinstance(p, DTensor) else p.detach()


def _worker(rank: int, port: int, mode: str, failures) -> None:
    import torch.distributed as dist

    from franca.train.parallel import parallelize
    from franca.train.ssl_meta_arch import SSLMetaArch

    torch.set_num_threads(1)
    cfg = load_config(None, TINY_STEP + [f"compute_precision.distributed={mode}"])
    torch.manual_seed(0)
    reference = SSLMetaArch(cfg)
    model = copy.deepcopy(reference)
    batch = make_batch(torch.Generator().manual_seed(1))
    # the single-process reference on the full batch, before the process group exists
    cpu = torch.device("cpu")
    ref_losses = reference.forward_backward(with_mask_lists(batch), 0.05, Runtime.resolve(cfg, cpu))
    ref_norms = reference.clip_gradients(0.05)

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        teacher_before = {n: p.detach().double().clone() for n, p in reference.teacher.named_parameters()}
        student_after = {}
        with torch.no_grad():
            for n, p in reference.student.named_parameters():
                student_after[n] = (p.detach() - 0.1 * p.grad).double()

        runtime = Runtime.resolve(cfg, cpu, world_size=2)
        assert parallelize(model, cfg, runtime, world_size=2) == mode
        losses = model.forward_backward(rank_slice(batch, rank, 2), 0.05, runtime)
        assert set(losses) == set(ref_losses)
        for key, value in losses.items():
            mean = value.detach().clone()
            dist.all_reduce(mean)
            torch.testing.assert_close(mean / 2, ref_losses[key], rtol=1e-5, atol=1e-6, msg=key)
        norms = model.clip_gradients(0.05)
        for name, norm in norms.items():
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            torch.testing.assert_close(norm, ref_norms[name], rtol=1e-5, atol=1e-6, msg=name)
        ref_params = dict(reference.student.named_parameters())
        for name, p in model.student.named_parameters():
            expected = ref_params[name].grad
            got = full_grad(p)
            if expected is None:
                assert got is None or not got.any(), name
                continue
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=name)
        with torch.no_grad():  # a plain SGD step on the (sharded) student, then the EMA
            for p in model.student.parameters():
                if p.grad is not None:
                    p.sub_(0.1 * p.grad)
        model.update_teacher(0.9)
        for name, p in model.teacher.named_parameters():
            expected = 0.9 * teacher_before[name] + 0.1 * student_after[name]
            torch.testing.assert_close(full_param(p).double(), expected, rtol=1e-5, atol=1e-6, msg=name)
    except BaseException as err:  # report to the parent: an assertion in a spawned process has no pytest context
        failures.put(f"rank {rank} ({mode}): {type(err).__name__}: {err}")
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
@pytest.mark.slow
def test_two_ranks_equal_one_process_on_the_concatenated_batch(mode):
    context = mp.get_context("spawn")
    failures = context.SimpleQueue()
    try:
        mp.spawn(_worker, args=(free_port(), mode, failures), nprocs=2)
    except mp.ProcessRaisedException:
        messages = []
        while not failures.empty():
            messages.append(failures.get())
        pytest.fail("\n".join(messages) or "a rank failed")
