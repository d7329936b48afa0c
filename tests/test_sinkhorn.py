"""Sinkhorn-Knopp targets against a float64 transcription of the original loop (``sinkhorn_knopp_teacher``).

Every check runs for ``sinkhorn_knopp`` and for ``sinkhorn_knopp_streaming`` (targets made chunk by chunk from [K]
scalings), with chunk sizes that do and do not divide the number of samples.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from franca.loss import SoftmaxCentering, sinkhorn_knopp, sinkhorn_knopp_streaming


def original_sinkhorn_float64(logits, temperature, n_iterations=3, divide_by_total_first=False):
    """The original's loop in float64, literally: no max-subtraction, with its K and B scale factors.

    ``divide_by_total_first`` is the iBOT variant's extra initial ``Q /= sum(Q)``.
    """
    q = torch.exp(logits.double() / temperature).T  # [K, B]
    n_prototypes, n_samples = q.shape
    if divide_by_total_first:
        q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(dim=1, keepdim=True)
        q = q / n_prototypes
        q = q / q.sum(dim=0, keepdim=True)
        q = q / n_samples
    return (q * n_samples).T


def streamed(chunk_size):
    """``sinkhorn_knopp_streaming`` with its target rows gathered chunk by chunk into one [B, K] tensor."""

    def targets(logits, temperature, n_iterations=3):
        result = sinkhorn_knopp_streaming(logits, temperature, n_iterations, chunk_size=chunk_size)
        n = logits.shape[0]
        return torch.cat([result.rows(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size) or [0]])

    return targets


IMPLEMENTATIONS = pytest.mark.parametrize(
    "sinkhorn",
    [sinkhorn_knopp, streamed(1), streamed(3), streamed(64)],
    ids=["plain", "streamed-1", "streamed-3", "streamed-64"],
)


def dyadic_logits(n_samples, n_prototypes, seed):
    """Logits that are multiples of 1/64 in [-2, 2]: adding integer offsets up to 1e4 stays exact in fp32."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 129, (n_samples, n_prototypes), generator=generator).float() / 64


@pytest.mark.parametrize("n_samples, n_prototypes", [(8, 5), (4, 16), (12, 12)])
@pytest.mark.parametrize("n_iterations", [1, 3, 5])
@IMPLEMENTATIONS
def test_matches_original_loop_in_float64(n_samples, n_prototypes, n_iterations, sinkhorn):
    logits = torch.randn(n_samples, n_prototypes, generator=torch.Generator().manual_seed(n_samples)) * 2
    targets = sinkhorn(logits, temperature=0.1, n_iterations=n_iterations)
    for divide_by_total_first in (False, True):
        expected = original_sinkhorn_float64(logits, 0.1, n_iterations, divide_by_total_first)
        torch.testing.assert_close(targets.double(), expected, rtol=1e-4, atol=1e-7)
    assert targets.dtype == torch.float32


@IMPLEMENTATIONS
def test_rows_are_distributions(sinkhorn):
    targets = sinkhorn(torch.randn(32, 7), temperature=0.05)
    assert (targets >= 0).all()
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(32))


@IMPLEMENTATIONS
def test_huge_common_offset_is_finite_and_exact(sinkhorn):
    # Adding a constant to every logit scales all of Q by one factor, which the first prototype normalisation
    # removes; the float64 original overflows at +1e4, so compare with it on the un-offset logits.
    logits = dyadic_logits(10, 6, seed=0)
    expected = original_sinkhorn_float64(logits, 1 / 16)
    for offset in (1e4, -1e4):
        targets = sinkhorn(logits + offset, temperature=1 / 16)
        assert torch.isfinite(targets).all()
        torch.testing.assert_close(targets.double(), expected, rtol=1e-5, atol=1e-7)


@IMPLEMENTATIONS
def test_large_per_prototype_offsets_are_exact(sinkhorn):
    # An offset per prototype (a column of the [B, K] logits) scales one prototype row of Q; the prototype
    # normalisation removes it exactly, so the targets equal the original's on the un-offset logits.
    logits = dyadic_logits(9, 7, seed=1)
    offsets = torch.tensor([5000.0, -3000.0, 0.0, 8000.0, -9000.0, 1234.0, 77.0])
    targets = sinkhorn(logits + offsets, temperature=1 / 16)
    torch.testing.assert_close(targets.double(), original_sinkhorn_float64(logits, 1 / 16), rtol=1e-5, atol=1e-7)


@IMPLEMENTATIONS
def test_sample_far_below_all_others_keeps_its_target(sinkhorn):
    # One sample is 20 below every prototype's maximum: exp((t - max)/τ) = e^-320 underflows fp32, so an
    # exp-domain fp32 loop would divide 0 by 0 for that sample. The float64 original is fine here.
    logits = dyadic_logits(6, 5, seed=2)
    logits[3] -= 20.0
    targets = sinkhorn(logits, temperature=1 / 16)
    assert torch.isfinite(targets).all()
    torch.testing.assert_close(targets.double(), original_sinkhorn_float64(logits, 1 / 16), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@IMPLEMENTATIONS
def test_low_precision_input_is_computed_in_fp32(dtype, sinkhorn):
    # Scores up to ~8/0.04 = 200 overflow an fp32 exp without the max-subtraction; float64 holds them.
    logits = (torch.randn(16, 9, generator=torch.Generator().manual_seed(3)) * 3).to(dtype)
    targets = sinkhorn(logits, temperature=0.04)
    assert targets.dtype == torch.float32 and torch.isfinite(targets).all()
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(16))
    torch.testing.assert_close(targets.double(), original_sinkhorn_float64(logits, 0.04), rtol=1e-3, atol=1e-6)


@IMPLEMENTATIONS
def test_empty_batch_gives_empty_targets(sinkhorn):
    assert sinkhorn(torch.zeros(0, 4), temperature=0.1).shape == (0, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"logits": torch.zeros(2, 3, 4), "temperature": 0.1}, "samples, prototypes"),
        ({"logits": torch.zeros(2, 3), "temperature": 0.0}, "temperature"),
        ({"logits": torch.zeros(2, 3), "temperature": 0.1, "n_iterations": 0}, "n_iterations"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    for function in (sinkhorn_knopp, sinkhorn_knopp_streaming):
        with pytest.raises(ValueError, match=message):
            function(**kwargs)
    with pytest.raises(ValueError, match="chunk_size=0"):
        sinkhorn_knopp_streaming(torch.zeros(2, 3), 0.1, chunk_size=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [1, 5, 7, 20, 64])
def test_streaming_equals_plain_and_keeps_only_prototype_vectors(dtype, chunk_size):
    logits = (torch.randn(20, 33, generator=torch.Generator().manual_seed(7)) * 4).to(dtype)
    result = sinkhorn_knopp_streaming(logits, 0.05, chunk_size=chunk_size)
    # What it holds: the caller's logits (same tensor, same dtype) and [K] fp32 vectors, no [B, K] fp32 tensor.
    assert result.logits is logits and result.shape == logits.shape
    assert result.prototype_max.shape == result.log_prototype_scale.shape == (33,)
    assert result.prototype_max.dtype == result.log_prototype_scale.dtype == torch.float32
    plain = sinkhorn_knopp(logits, 0.05)
    torch.testing.assert_close(streamed(chunk_size)(logits, 0.05), plain, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(result.rows(3, 11), plain[3:11], rtol=1e-5, atol=1e-7)


def test_padding_rows_would_shift_real_targets():
    # The original runs the iBOT Sinkhorn on a zero-padded buffer: the padding rows are head(0), one constant
    # logits row repeated. They change the real rows' targets; our API takes the real rows only.
    real = torch.randn(5, 6, generator=torch.Generator().manual_seed(4))
    padding = torch.randn(1, 6, generator=torch.Generator().manual_seed(5)).expand(3, 6)
    padded_reference = original_sinkhorn_float64(torch.cat((real, padding)), 0.1, divide_by_total_first=True)[:5]
    real_reference = original_sinkhorn_float64(real, 0.1, divide_by_total_first=True)
    assert (padded_reference - real_reference).abs().max() > 1e-2
    torch.testing.assert_close(sinkhorn_knopp(real, 0.1).double(), real_reference, rtol=1e-4, atol=1e-7)


def distributed_worker(rank, world_size, port, logits_per_rank, centering_logits_per_rank, results_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        targets = [sinkhorn_knopp(case[rank], temperature=0.1) for case in logits_per_rank]
        streamed_targets = [streamed(2)(case[rank], temperature=0.1) for case in logits_per_rank]
        centering = SoftmaxCentering([3, 5], center_momentum=0.5)
        centering.update([levels[rank] for levels in centering_logits_per_rank])
        results = {"targets": targets, "streamed": streamed_targets, "centers": centering.centers}
        torch.save(results, f"{results_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    generator = torch.Generator().manual_seed(6)
    # Uneven splits, one rank without samples (an iBOT rank may hold no masked token), and a per-prototype
    # offset on one rank only, which the MAX all-reduce must handle.
    uneven = torch.randn(8, 6, generator=generator)
    one_empty = torch.randn(4, 6, generator=generator)
    offset = torch.randn(6, 6, generator=generator)
    offset[:2] += torch.tensor([50.0, 0.0, -50.0, 0.0, 0.0, 0.0])
    logits_per_rank = [(uneven[:3], uneven[3:]), (one_empty, one_empty[:0]), (offset[:2], offset[2:])]
    centering_levels = [torch.randn(7, 3, generator=generator), torch.randn(7, 5, generator=generator)]
    centering_logits_per_rank = [(levels[:2], levels[2:]) for levels in centering_levels]
    results_path = tmp_path / "results"

    mp.spawn(
        distributed_worker,
        args=(2, free_port(), logits_per_rank, centering_logits_per_rank, str(results_path)),
        nprocs=2,
        join=True,
    )

    results = [torch.load(f"{results_path}.{rank}", weights_only=True) for rank in range(2)]
    for case, (first, second) in enumerate(logits_per_rank):
        batch = torch.cat((first, second))
        for key in ("targets", "streamed"):
            distributed = torch.cat((results[0][key][case], results[1][key][case]))
            torch.testing.assert_close(distributed, sinkhorn_knopp(batch, temperature=0.1), msg=key)
            expected = original_sinkhorn_float64(batch, 0.1)
            torch.testing.assert_close(distributed.double(), expected, rtol=1e-4, atol=1e-7, msg=key)
    for level, logits in enumerate(centering_levels):
        expected = 0.5 * logits.double().mean(dim=0, keepdim=True)
        for rank in range(2):
            torch.testing.assert_close(results[rank]["centers"][level].double(), expected)
