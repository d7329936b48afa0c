"""DINO and iBOT losses and softmax centering against brute-force float64 loops."""

import math

import pytest
import torch

from franca.loss import DINOLoss, IBOTPatchLoss, SoftmaxCentering, dino_cross_entropy


def cross_entropy_float64(teacher_row, student_row, student_temp):
    """−Σ_k t_k log softmax(s/τ)_k for one row, with an explicit log-sum-exp."""
    scores = [float(s) / student_temp for s in student_row]
    top = max(scores)
    log_norm = top + math.log(sum(math.exp(s - top) for s in scores))
    return -sum(float(t) * (s - log_norm) for t, s in zip(teacher_row, scores, strict=True))


def random_probs(rows, n_prototypes, generator):
    return torch.randn(rows, n_prototypes, generator=generator).softmax(dim=-1)


def brute_force_dino(student_levels, teacher_levels, weights, student_temp, n_s, n_t, skip_same_view):
    total = 0.0
    for weight, student, teacher in zip(weights, student_levels, teacher_levels, strict=True):
        batch = student.shape[0] // n_s
        for s in range(n_s):
            for t in range(n_t):
                if skip_same_view and s == t:
                    continue
                pair = sum(
                    cross_entropy_float64(teacher[t * batch + b], student[s * batch + b], student_temp)
                    for b in range(batch)
                )
                total += weight * pair / batch
    return total


@pytest.mark.parametrize(
    "n_student_crops, n_teacher_crops, skip_same_view",
    [(2, 2, True), (2, 2, False), (4, 2, False), (3, 2, True)],
)
def test_dino_loss_matches_brute_force_over_pairs_and_levels(n_student_crops, n_teacher_crops, skip_same_view):
    generator = torch.Generator().manual_seed(n_student_crops)
    batch, out_dims, weights = 3, (4, 8, 16), [1.0, 0.5, 2.0]
    students = [torch.randn(n_student_crops * batch, k, generator=generator) * 3 for k in out_dims]
    teachers = [random_probs(n_teacher_crops * batch, k, generator) for k in out_dims]
    loss = DINOLoss(student_temp=0.1, level_weights=weights)(
        students, teachers, n_student_crops, n_teacher_crops, skip_same_view
    )
    expected = brute_force_dino(students, teachers, weights, 0.1, n_student_crops, n_teacher_crops, skip_same_view)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_dino_loss_sums_levels_with_equal_weight_by_default():
    generator = torch.Generator().manual_seed(10)
    students = [torch.randn(4, k, generator=generator) for k in (3, 6)]
    teachers = [random_probs(4, k, generator) for k in (3, 6)]
    loss = DINOLoss(student_temp=0.1)(students, teachers, 2, 2, skip_same_view=True)
    expected = brute_force_dino(students, teachers, [1.0, 1.0], 0.1, 2, 2, True)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_dino_cross_entropy_single_pair_closed_form():
    # One crop each, one image, two prototypes: CE = −[t0 log σ0 + t1 log σ1] with softmax of s/τ.
    student = torch.tensor([[0.2, -0.1]])
    teacher = torch.tensor([[0.25, 0.75]])
    log_p1 = -math.log1p(math.exp((0.2 - -0.1) / 0.1))
    log_p0 = log_p1 + (0.2 - -0.1) / 0.1
    expected = -(0.25 * log_p0 + 0.75 * log_p1)
    assert dino_cross_entropy(student, teacher, 0.1, 1, 1).item() == pytest.approx(expected, rel=1e-6)


def test_dino_loss_accepts_bf16_and_backpropagates():
    generator = torch.Generator().manual_seed(11)
    student = torch.randn(6, 5, generator=generator).bfloat16().requires_grad_()
    teacher = random_probs(4, 5, generator)
    loss = dino_cross_entropy(student, teacher, 0.1, n_student_crops=3, n_teacher_crops=2)
    expected = brute_force_dino([student.detach().float()], [teacher], [1.0], 0.1, 3, 2, False)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad.float()).all()


@pytest.mark.parametrize(
    "student_shape, teacher_shape, n_s, n_t, message",
    [
        ((5, 4), (4, 4), 2, 2, "student_logits"),
        ((4, 4), (6, 4), 2, 2, "share the images per crop"),
        ((4, 4), (4, 3), 2, 2, "number of prototypes"),
    ],
)
def test_dino_cross_entropy_rejects_mismatched_shapes(student_shape, teacher_shape, n_s, n_t, message):
    with pytest.raises(ValueError, match=message):
        dino_cross_entropy(torch.zeros(student_shape), torch.zeros(teacher_shape), 0.1, n_s, n_t)


def test_dino_loss_rejects_level_count_mismatch():
    with pytest.raises(ValueError, match="level"):
        DINOLoss(level_weights=[1.0])([torch.zeros(2, 3)] * 2, [torch.zeros(2, 3)] * 2, 1, 1)
    with pytest.raises(ValueError, match="student and 1 teacher levels"):
        DINOLoss()([torch.zeros(2, 3)] * 2, [torch.zeros(2, 3)], 1, 1)


def test_ibot_loss_matches_brute_force():
    generator = torch.Generator().manual_seed(12)
    n_masked, out_dims, weights = 7, (4, 8), [1.0, 3.0]
    # Tokens 0-2 from one image (3 masked), 3-6 from another (4 masked): weight 1/#masked of the image.
    masks_weight = torch.tensor([1 / 3] * 3 + [1 / 4] * 4)
    students = [torch.randn(n_masked, k, generator=generator) * 2 for k in out_dims]
    teachers = [random_probs(n_masked, k, generator) for k in out_dims]
    loss = IBOTPatchLoss(student_temp=0.1, level_weights=weights)(students, teachers, masks_weight, n_global_images=4)
    expected = 0.0
    for weight, student, teacher in zip(weights, students, teachers, strict=True):
        for m in range(n_masked):
            expected += weight * float(masks_weight[m]) * cross_entropy_float64(teacher[m], student[m], 0.1)
    expected /= 4
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_ibot_loss_with_no_masked_token_is_zero_and_differentiable():
    student = torch.zeros(0, 4, requires_grad=True)
    loss = IBOTPatchLoss()([student], [torch.zeros(0, 4)], torch.zeros(0), n_global_images=2)
    assert loss.item() == 0.0
    loss.backward()


def test_ibot_loss_refuses_padding_rows():
    # Targets of a zero-padded buffer (as the original's) have more rows than masks_weight: refused.
    masks_weight = torch.full((3,), 1 / 3)
    with pytest.raises(ValueError, match="no padding rows"):
        IBOTPatchLoss()([torch.zeros(3, 4)], [torch.zeros(5, 4)], masks_weight, n_global_images=2)
    with pytest.raises(ValueError, match="n_global_images"):
        IBOTPatchLoss()([torch.zeros(3, 4)], [torch.zeros(3, 4)], masks_weight, n_global_images=0)


def test_centering_per_level_matches_hand_computation():
    centering = SoftmaxCentering([2, 3], center_momentum=0.9)
    level0 = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mean [2, 0]
    level1 = torch.tensor([[0.0, 1.0, 2.0], [0.0, 3.0, 0.0], [0.0, 2.0, 1.0]])  # mean [0, 2, 1]
    tau = 0.5

    before = centering.targets([level0, level1], tau)  # centres are zero: plain softmax(t/τ)
    e = math.exp(1 / tau)
    assert before[0][0].tolist() == pytest.approx([e / (e + 1), 1 / (e + 1)])

    centering.update([level0, level1])
    assert centering.center_0[0].tolist() == pytest.approx([0.2, 0.0])
    assert centering.center_1[0].tolist() == pytest.approx([0.0, 0.2, 0.1])

    after = centering.targets([level0, level1], tau)
    # Row [0, 3, 0] of level 1 minus centre [0, .2, .1], divided by τ = .5: scores [0, 5.6, -0.2].
    scores = [0.0, 5.6, -0.2]
    norm = sum(math.exp(s) for s in scores)
    assert after[1][1].tolist() == pytest.approx([math.exp(s) / norm for s in scores], rel=1e-6)

    centering.update([level0 * 2, level1])
    assert centering.center_0[0].tolist() == pytest.approx([0.9 * 0.2 + 0.1 * 4.0, 0.0])
    assert set(centering.state_dict()) == {"center_0", "center_1"}
    assert centering.center_0.shape == (1, 2) and centering.center_1.shape == (1, 3)


def test_centering_rejects_other_prototype_counts():
    with pytest.raises(ValueError, match="out_dims"):
        SoftmaxCentering([2, 3]).targets([torch.zeros(1, 2), torch.zeros(1, 4)], 0.1)
