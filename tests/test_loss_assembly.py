"""``SSLMetaArch.assemble_losses`` in float64 against an independent transcription of how DINOv2 combines its terms.

The reference below follows the structure of DINOv2's ``SSLMetaArch.forward_backward`` (dinov2/train/ssl_meta_arch.py),
written out here with explicit loops, and Franca's sum over Matryoshka levels (paper arXiv 2507.14137, Sec. 3):

- DINO: the teacher's two global views are swapped (view B first, view A second) so that each student global crop
  meets the other view's target; the global term is the mean over the 2B rows times 2; each of the L local crops
  meets both teacher views; both terms are divided by (2 − 1)·2 + max(2·L, 1) (2 + 2L; 3 without local crops) and
  scaled by ``dino.loss_weight``;
- KoLeo: ``dino.koleo_loss_weight`` × the sum over the two global views of −mean log(‖x̂ − x̂_nn + ε‖ + ε);
- iBOT: −Σ_m masks_weight_m ⟨t_m, log softmax(s_m/τ)⟩ / (2B), times 2 (both global crops at once) and 1/2 (one over
  the number of global crops), scaled by ``ibot.loss_weight``;
- every DINO and iBOT term is Σ_l w_l over the Matryoshka levels with ``{dino,ibot}.level_weights``.

Inputs are tiny random float64 tensors; the library must agree to ~1e-12 relative (float64 rounding), where a wrong
pair, divisor, weight or level would be off by O(1).
"""

import pytest
import torch
from helpers import TINY_STEP

from franca.train.config import load_config
from franca.train.ssl_meta_arch import SSLMetaArch, StudentOutputs, TeacherTargets

STUDENT_TEMP = 0.1
EPS = 1e-8
IMAGES = 4  # B images, so 2B global crops
MASKED_PER_IMAGE = [3, 1, 0, 2, 0, 0, 5, 0]  # masked tokens of each of the 2B global crops
LEVEL_OVERRIDES = [
    "dino.nesting_list=[8,16,32]",
    "dino.level_weights=[0.5,1.0,2.0]",
    "ibot.level_weights=[1.5,0.25,1.0]",
    "dino.loss_weight=0.7",
    "ibot.loss_weight=1.3",
]


def cross_entropy_rows(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """−Σ_k t_k log softmax(s/τ)_k of each row."""
    return -(target * torch.log_softmax(logits / STUDENT_TEMP, dim=-1)).sum(dim=-1)


def reference_dino(local: torch.Tensor, global_: torch.Tensor, target: torch.Tensor, n_local: int) -> tuple:
    """One level's (local, global) DINO sums before the pair divisor, DINOv2-style."""
    view_a, view_b = target.chunk(2)
    swapped = torch.cat([view_b, view_a])
    global_sum = cross_entropy_rows(swapped, global_).mean() * 2
    crops = local.chunk(n_local) if n_local else ()
    local_sum = sum(cross_entropy_rows(view, crop).mean() for crop in crops for view in (view_a, view_b))
    return local_sum, global_sum


def reference_koleo(features: torch.Tensor) -> torch.Tensor:
    """−mean_i log(‖x̂_i − x̂_nn(i) + ε‖ + ε), the nearest neighbour by the largest inner product, by brute force."""
    unit = features / features.norm(dim=-1, keepdim=True).clamp_min(EPS)
    logs = []
    for i in range(unit.shape[0]):
        others = [j for j in range(unit.shape[0]) if j != i]
        nearest = max(others, key=lambda j: float(unit[i] @ unit[j]))
        logs.append(torch.log((unit[i] - unit[nearest] + EPS).norm() + EPS))
    return -torch.stack(logs).mean()


def reference_losses(cfg, student: StudentOutputs, teacher: TeacherTargets, masks_weight: torch.Tensor) -> dict:
    n_local = cfg.crops.local_crops_number
    n_global_crops = 2
    n_terms = (n_global_crops - 1) * n_global_crops + max(n_local * n_global_crops, 1)
    n_local_rows = n_local * IMAGES
    local_total = global_total = ibot_total = 0.0
    for level, weight in enumerate(cfg.dino.level_weights):
        logits = student.dino_logits[level]
        local_sum, global_sum = reference_dino(
            logits[:n_local_rows], logits[n_local_rows:], teacher.dino[level], n_local
        )
        local_total = local_total + weight * local_sum
        global_total = global_total + weight * global_sum
    for level, weight in enumerate(cfg.ibot.level_weights):
        weighted = masks_weight * cross_entropy_rows(teacher.ibot[level], student.ibot_logits[level])
        ibot_total = ibot_total + weight * weighted.sum() / (n_global_crops * IMAGES) * 2 * (1 / n_global_crops)
    losses = {"dino_global_crops_loss": cfg.dino.loss_weight * global_total / n_terms}
    if n_local:
        losses["dino_local_crops_loss"] = cfg.dino.loss_weight * local_total / n_terms
    if cfg.dino.koleo_loss_weight > 0:
        views = student.global_cls.chunk(2)
        losses["koleo_loss"] = cfg.dino.koleo_loss_weight * sum(reference_koleo(v) for v in views)
    losses["ibot_loss"] = cfg.ibot.loss_weight * ibot_total
    return losses


def random_inputs(model: SSLMetaArch, n_local: int, generator: torch.Generator) -> tuple:
    """Float64 student logits and features, teacher targets (rows summing to 1) and iBOT token weights."""

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    def distribution(*shape):
        return torch.softmax(randn(*shape) * 3, dim=-1)

    dino_dims, ibot_dims = model.student["dino_head"].out_dims, model.student["ibot_head"].out_dims
    n_masked = sum(MASKED_PER_IMAGE)
    rows = (n_local + 2) * IMAGES
    student = StudentOutputs(
        dino_logits=[randn(rows, k) for k in dino_dims],
        global_cls=randn(2 * IMAGES, 32),
        ibot_logits=[randn(n_masked, k) for k in ibot_dims],
    )
    teacher = TeacherTargets(
        dino=[distribution(2 * IMAGES, k) for k in dino_dims],
        ibot=[distribution(n_masked, k) for k in ibot_dims],
        cls=randn(2 * IMAGES, 32),
    )
    masks_weight = torch.cat([torch.full((n,), 1.0 / n, dtype=torch.float64) for n in MASKED_PER_IMAGE if n])
    return student, teacher, masks_weight


@pytest.mark.parametrize("n_local, koleo_weight", [(3, 0.1), (0, 0.0), (1, 0.25)])
def test_assembled_losses_equal_the_dinov2_transcription_in_float64(n_local, koleo_weight):
    overrides = [f"crops.local_crops_number={n_local}", f"dino.koleo_loss_weight={koleo_weight}"]
    cfg = load_config(None, TINY_STEP + LEVEL_OVERRIDES + overrides)
    model = SSLMetaArch(cfg)
    student, teacher, masks_weight = random_inputs(model, n_local, torch.Generator().manual_seed(n_local))
    got = model.assemble_losses(student, teacher, masks_weight)
    expected = reference_losses(cfg, student, teacher, masks_weight)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == torch.float64, key
        torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-14, msg=key)
