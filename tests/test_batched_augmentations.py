"""The split multi-crop augmentation (franca/data/batched_augmentations.py) against torchvision's per-image ops and
against the per-image transform DataAugmentationDINO under the same seed."""

import pytest
import torch
from PIL import Image
from skimage import data as skdata
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from franca.data import batched_augmentations as ba
from franca.data.augmentations import DataAugmentationDINO
from franca.data.collate import MaskingCollator
from franca.data.masking import CyclicMask
from franca.data.samplers import SampleKey
from franca.data.seeded_transform import SeededTransformDataset, seeded_global_rngs

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TV_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
CROPS = dict(global_crops_scale=(0.32, 1.0), local_crops_scale=(0.05, 0.32), local_crops_number=3)
SIZES = dict(global_crops_size=20, local_crops_size=10)


def random_images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Float images in [0, 1] with some exactly gray and some saturated pixels (the HSV edge cases)."""
    images = torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed))
    images[:, :, 0, :4] = images[:, :1, 0, :4]  # gray: hue and saturation 0
    images[:, :, 1, :2] = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1)  # pure red, hue 0
    return images


def params_row(jitter=None, order=(0, 1, 2, 3), gray=False, sigma=None, solarize=False) -> torch.Tensor:
    """A parameter vector built column by column (jitter = (brightness, contrast, saturation, hue) or None)."""
    row = torch.zeros(ba.N_PARAMS)
    row[ba.BRIGHTNESS : ba.HUE + 1] = torch.tensor(jitter or (1.0, 1.0, 1.0, 0.0))
    row[ba.JITTER] = float(jitter is not None)
    row[ba.ORDER] = torch.tensor(order, dtype=torch.float32)
    row[ba.GRAYSCALE], row[ba.SOLARIZE] = float(gray), float(solarize)
    row[ba.BLUR], row[ba.SIGMA] = float(sigma is not None), sigma or 0.0
    return row


def per_image_reference(image: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """torchvision's per-image ops in DataAugmentationDINO's order, driven by one parameter vector."""
    if row[ba.JITTER]:
        factors = row[ba.BRIGHTNESS : ba.HUE + 1].tolist()
        for op_index in row[ba.ORDER].long().tolist():
            image = TV_JITTER[op_index](image, factors[op_index])
    if row[ba.GRAYSCALE]:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if row[ba.BLUR]:
        kernel = min(9, 2 * min(image.shape[-2:]) - 1)
        image = TF.gaussian_blur(image, [kernel, kernel], [float(row[ba.SIGMA])] * 2)
    if row[ba.SOLARIZE]:
        image = TF.solarize(image, 128 / 255)
    return TF.normalize(image, MEAN, STD)


def float_threshold_reference(**kwargs) -> DataAugmentationDINO:
    """DataAugmentationDINO for float images: its solarize threshold 128 (uint8 scale) becomes 128/255, the same
    draw (torchvision refuses a threshold above 1 on float images)."""
    augmentation = DataAugmentationDINO(**kwargs)
    steps = augmentation.global_transform_2.transforms
    (index,) = [i for i, step in enumerate(steps) if isinstance(step, v2.RandomSolarize)]
    steps[index] = v2.RandomSolarize(threshold=128 / 255, p=steps[index].p)
    return augmentation


def both_paths(reference, split, image, seed: int) -> tuple[dict, dict]:
    """The per-image and the split transform's outputs for ``image`` under the same per-sample seed."""
    with seeded_global_rngs([seed]):
        expected = reference(image)
    with seeded_global_rngs([seed]):
        return expected, split(image)


@pytest.mark.parametrize(
    "op_index, factors",
    [(0, (0.6, 1.0, 1.4)), (1, (0.6, 1.0, 1.4)), (2, (0.8, 1.0, 1.2)), (3, (-0.1, 0.0, 0.07)), (3, (0.5, -0.5, 0.3))],
)
def test_jitter_ops_match_torchvision_per_image(op_index, factors):
    images = random_images(3, 12, 14)
    batched_op = ba.JITTER_OPS[op_index][0]
    got = batched_op(images, torch.tensor(factors))
    expected = torch.stack([TV_JITTER[op_index](image, f) for image, f in zip(images, factors, strict=True)])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("height, width, kernel", [(16, 18, 9), (4, 6, 7), (3, 3, 5), (1, 2, 1)])
def test_blur_matches_torchvision_with_the_kernel_capped_for_small_crops(height, width, kernel):
    images = torch.rand(3, 3, height, width, generator=torch.Generator().manual_seed(1))
    sigmas = torch.tensor([0.1, 0.9, 2.0])
    got = ba.gaussian_blur(images, sigmas)
    expected = torch.stack([TF.gaussian_blur(im, [kernel, kernel], [float(s)] * 2) for im, s in zip(images, sigmas)])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_apply_photometric_runs_each_crops_own_jitter_order_and_steps():
    rows = [
        params_row(),
        params_row(jitter=(1.3, 0.7, 1.15, 0.08), order=(0, 1, 2, 3)),
        params_row(jitter=(1.3, 0.7, 1.15, 0.08), order=(3, 2, 1, 0)),
        params_row(jitter=(0.65, 1.35, 0.85, -0.09), order=(2, 0, 3, 1), gray=True),
        params_row(jitter=(1.1, 1.2, 0.9, 0.03), order=(1, 3, 0, 2), sigma=1.7, solarize=True),
        params_row(gray=True, sigma=0.3),
        params_row(solarize=True),
    ]
    images = random_images(len(rows), 11, 13, seed=2)
    params = torch.stack(rows)
    got = ba.apply_photometric(images, params)
    expected = torch.stack([per_image_reference(image, row) for image, row in zip(images, rows, strict=True)])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(got[1], got[2], atol=1e-3)  # the order matters, so each crop's own order was used
    uint8 = (images * 255).round().to(torch.uint8)
    torch.testing.assert_close(ba.apply_photometric(uint8, params), ba.apply_photometric(uint8 / 255.0, params))


@pytest.mark.parametrize("blur_quirk", [True, False])
@pytest.mark.slow
def test_split_path_equals_the_per_image_transform_under_the_same_seed(blur_quirk):
    """Same seed → same crops and parameters: the split path's draws are the per-image transform's draws."""
    reference = float_threshold_reference(**CROPS, **SIZES, blur_quirk=blur_quirk)
    split = ba.SplitDataAugmentationDINO(**CROPS, **SIZES, blur_quirk=blur_quirk)
    image = random_images(1, 30, 36, seed=3)[0]
    drawn = []
    for seed in range(40):
        expected, got = both_paths(reference, split, image, seed)
        for kind in ("global", "local"):
            params = torch.stack(got[f"{kind}_params"])
            finished = ba.apply_photometric(torch.stack(got[f"{kind}_crops"]), params)
            torch.testing.assert_close(finished, torch.stack(expected[f"{kind}_crops"]), atol=1e-5, rtol=0)
            drawn.append(params)
    drawn = torch.cat(drawn)
    for column in (ba.JITTER, ba.GRAYSCALE, ba.BLUR, ba.SOLARIZE):  # every step seen applied and skipped
        assert set(drawn[:, column].tolist()) == {0.0, 1.0}, column


@pytest.mark.slow
def test_parameter_draws_have_the_reference_probabilities():
    """Fixed seed, 4000 draws per crop kind: each frequency within 5 binomial standard deviations of the original's."""
    n = 4000
    with seeded_global_rngs([7]):
        kinds = {
            "global 1": torch.stack([ba.draw_photometric_params(0.0) for _ in range(n)]),
            "global 2": torch.stack([ba.draw_photometric_params(0.9, 0.2) for _ in range(n)]),
            "local": torch.stack([ba.draw_photometric_params(0.5) for _ in range(n)]),
        }
    expected = {"global 1": (0.8, 0.2, 0.0, 0.0), "global 2": (0.8, 0.2, 0.9, 0.2), "local": (0.8, 0.2, 0.5, 0.0)}
    for kind, draws in kinds.items():
        for column, p in zip((ba.JITTER, ba.GRAYSCALE, ba.BLUR, ba.SOLARIZE), expected[kind], strict=True):
            assert abs(draws[:, column].mean().item() - p) <= 5 * (p * (1 - p) / n) ** 0.5 + 1e-9, (kind, column)
        jittered = draws[draws[:, ba.JITTER] == 1]
        for column, (low, high) in zip(
            range(ba.BRIGHTNESS, ba.HUE + 1), ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
        ):
            values = jittered[:, column]
            assert low <= values.min() and values.max() <= high and values.max() - values.min() > 0.9 * (high - low)
        assert (jittered[:, ba.ORDER].sort(dim=1).values == torch.arange(4.0)).all()  # permutations
        assert len({tuple(order) for order in jittered[:, ba.ORDER].tolist()}) == 24
        blurred = draws[draws[:, ba.BLUR] == 1, ba.SIGMA]
        assert blurred.numel() == 0 or (0.1 <= blurred.min() and blurred.max() <= 2.0)


@pytest.mark.slow
def test_pil_photos_differ_from_the_per_image_path_by_uint8_rounding_only():
    """On PIL images the per-image path rounds to uint8 after every operation; the split path computes in float. Same
    crops and parameters: a mean difference of about one grey level (docs/deviations.md)."""
    photo = Image.fromarray(skdata.astronaut()).resize((96, 96))
    kwargs = dict(**CROPS, global_crops_size=48, local_crops_size=24)
    reference, split = DataAugmentationDINO(**kwargs), ba.SplitDataAugmentationDINO(**kwargs)
    levels = []
    for seed in range(8):
        expected, got = both_paths(reference, split, photo, seed)
        assert all(crop.dtype == torch.uint8 for crop in got["global_crops"] + got["local_crops"])
        for kind in ("global", "local"):
            finished = ba.apply_photometric(torch.stack(got[f"{kind}_crops"]), torch.stack(got[f"{kind}_params"]))
            std = torch.tensor(STD).view(1, 3, 1, 1)
            levels.append(((finished - torch.stack(expected[f"{kind}_crops"])) * std * 255).abs().mean(dim=(1, 2, 3)))
    per_crop = torch.cat(levels)
    assert per_crop.mean() < 2.0 and per_crop.max() < 6.0, per_crop


def test_the_same_sample_key_gives_the_same_crops_and_parameters():
    photos = [Image.fromarray(skdata.astronaut()).resize((64, 48)), Image.fromarray(skdata.coffee()).resize((50, 60))]
    dataset = [(photo, 0) for photo in photos]
    split = ba.SplitDataAugmentationDINO(**CROPS, **SIZES)
    first = SeededTransformDataset(dataset, split, seed=5)
    again = SeededTransformDataset(dataset, split, seed=5)
    key = SampleKey(index=1, pass_index=2, iteration=9)
    a, b = first[key][0], again[key][0]
    for name in ("global_crops", "local_crops", "global_params", "local_params"):
        assert all(torch.equal(x, y) for x, y in zip(a[name], b[name], strict=True)), name
    other = first[SampleKey(index=1, pass_index=3, iteration=9)][0]
    assert not torch.equal(torch.stack(a["local_params"]), torch.stack(other["local_params"]))


def test_collated_split_batch_equals_the_per_image_batch_after_the_device_step():
    """The collate stacks uint8 crops and parameters crop-major and draws the same masks; finishing the crops gives
    the per-image path's batch (float images, where both paths are exact)."""
    images = random_images(4, 26, 30, seed=4)
    collator = MaskingCollator(mask_generator=CyclicMask((5, 5)), n_tokens=25, seed=1)
    per_image = SeededTransformDataset(list(zip(images, range(4))), float_threshold_reference(**CROPS, **SIZES), 0)
    split = SeededTransformDataset(list(zip(images, range(4))), ba.SplitDataAugmentationDINO(**CROPS, **SIZES), 0)
    keys = [SampleKey(index=i, pass_index=0, iteration=3) for i in (2, 0, 3, 1)]
    expected = collator([per_image[key] for key in keys])
    collated = collator([split[key] for key in keys])
    assert collated["photometric_params"]["global"].shape == (8, ba.N_PARAMS)
    assert collated["photometric_params"]["local"].shape == (12, ba.N_PARAMS)
    finished = ba.apply_photometric_to_batch(collated)
    assert "photometric_params" not in finished and "photometric_params" in collated
    assert finished.keys() == expected.keys()
    for name, value in expected.items():
        if torch.is_tensor(value) and value.is_floating_point():
            torch.testing.assert_close(finished[name], value, atol=1e-5, rtol=0, msg=name)
        elif torch.is_tensor(value):
            assert torch.equal(finished[name], value), name
        else:
            assert finished[name] == value, name


def test_no_local_crops_and_bad_inputs():
    image = random_images(1, 20, 20)[0]
    crops = ba.SplitDataAugmentationDINO(**{**CROPS, "local_crops_number": 0}, **SIZES)(image)
    assert crops["local_crops"] == [] and crops["local_params"] == []
    assert ba.apply_photometric(torch.empty(0), torch.empty(0)).numel() == 0
    with pytest.raises(ValueError, match=r"params of shape \(2, 5\) for 2 crops"):
        ba.apply_photometric(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        ba.apply_photometric(torch.zeros(2, 1, 4, 4), torch.zeros(2, ba.N_PARAMS))
    with pytest.raises(TypeError, match="torch.int32"):
        ba.apply_photometric(torch.zeros(1, 3, 4, 4, dtype=torch.int32), params_row().unsqueeze(0))
    with pytest.raises(KeyError, match="crops.batched_photometric"):
        ba.apply_photometric_to_batch({"collated_global_crops": torch.zeros(1, 3, 4, 4)})
    with pytest.raises(ValueError, match="local_crops_scale"):
        ba.SplitDataAugmentationDINO((0.3, 1.0), (0.5, 0.1), 2)
    black = ba.apply_photometric(torch.zeros(1, 3, 4, 4), params_row(jitter=(1, 1, 1, 0.1)).unsqueeze(0))
    assert torch.isfinite(black).all()
