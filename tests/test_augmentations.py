"""Multi-crop augmentation (as the original), the blur on tiny crops, per-sample seeding and the eval transform."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from franca.data.augmentations import (
    DataAugmentationDINO,
    SizeCappedGaussianBlur,
    make_classification_eval_transform,
    make_classification_train_transform,
)
from franca.data.seeded_transform import seeded_global_rngs

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def random_image(seed: int, size=(40, 32)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def small_augmentation(**overrides) -> DataAugmentationDINO:
    settings = dict(
        global_crops_scale=(0.32, 1.0),
        local_crops_scale=(0.05, 0.32),
        local_crops_number=3,
        global_crops_size=28,
        local_crops_size=12,
    )
    settings.update(overrides)
    return DataAugmentationDINO(**settings)


def test_output_keys_and_shapes():
    output = small_augmentation()(random_image(0))
    assert set(output) == {"global_crops", "global_crops_teacher", "local_crops", "offsets"}
    assert len(output["global_crops"]) == 2 and len(output["local_crops"]) == 3
    assert all(crop.shape == (3, 28, 28) and crop.dtype == torch.float32 for crop in output["global_crops"])
    assert all(crop.shape == (3, 12, 12) for crop in output["local_crops"])
    assert output["global_crops_teacher"] == output["global_crops"] and output["offsets"] == ()


def test_tiny_local_crops_work():
    output = small_augmentation(local_crops_size=4, local_crops_number=6, blur_quirk=False)(random_image(1))
    assert all(crop.shape == (3, 4, 4) and torch.isfinite(crop).all() for crop in output["local_crops"])


def blur_probabilities(augmentation: DataAugmentationDINO) -> list[float]:
    found = []
    for pipeline in (augmentation.global_transform_1, augmentation.global_transform_2, augmentation.local_transform):
        found += [
            step.p
            for step in pipeline.transforms
            if isinstance(step, v2.RandomApply) and isinstance(step.transforms[0], SizeCappedGaussianBlur)
        ]
    return found


def test_blur_probabilities_with_and_without_the_dinov2_quirk():
    assert blur_probabilities(small_augmentation()) == [0.0, 0.9, 0.5]
    assert blur_probabilities(small_augmentation(blur_quirk=False)) == [1.0, 0.1, 0.5]
    solarize = [
        [isinstance(step, v2.RandomSolarize) for step in pipeline.transforms]
        for pipeline in (small_augmentation().global_transform_1, small_augmentation().global_transform_2)
    ]
    assert solarize[0].count(True) == 0 and solarize[1].count(True) == 1


def reference_blur(image: np.ndarray, kernel_size: int, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with reflect padding, float64, from the textbook formula."""
    half = (kernel_size - 1) / 2
    offsets = np.arange(kernel_size) - half
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    pad = kernel_size // 2
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    height, width = image.shape[1:]
    rows = sum(kernel[k] * padded[:, k : k + height, :] for k in range(kernel_size))
    return sum(kernel[k] * rows[:, :, k : k + width] for k in range(kernel_size))


@pytest.mark.parametrize("side, expected_kernel", [(12, 9), (5, 9), (3, 5), (1, 1)])
def test_blur_matches_reference_and_shrinks_its_kernel_for_tiny_images(side, expected_kernel):
    image = torch.rand(3, side, side, dtype=torch.float64)
    blurred = SizeCappedGaussianBlur(kernel_size=9, sigma=(0.8, 0.8))(image)
    expected = reference_blur(image.numpy(), expected_kernel, 0.8)
    np.testing.assert_allclose(blurred.numpy(), expected, atol=1e-6)


def test_crops_are_a_function_of_the_seed_only():
    augmentation, image = small_augmentation(), random_image(2)

    def crops(entropy):
        with seeded_global_rngs(entropy):
            output = augmentation(image)
        return torch.cat([crop.flatten() for crop in output["global_crops"] + output["local_crops"]])

    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(6)
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    first = crops([0, 0, 7])
    assert torch.equal(first, crops([0, 0, 7]))
    assert not torch.equal(first, crops([0, 0, 8]))
    assert not torch.equal(first, crops([0, 1, 7]))
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1] and np.array_equal(np.random.get_state()[1], states[2])


def test_invalid_scales_are_refused():
    with pytest.raises(ValueError, match="global_crops_scale"):
        small_augmentation(global_crops_scale=(0.5, 0.2))


def test_eval_transform_resizes_crops_and_normalises():
    image = Image.new("RGB", (400, 300), (200, 100, 50))
    output = make_classification_eval_transform(resize_size=256, crop_size=224)(image)
    assert output.shape == (3, 224, 224)
    expected = (np.array([200, 100, 50]) / 255 - MEAN) / STD
    np.testing.assert_allclose(output.mean(dim=(1, 2)).numpy(), expected, atol=1e-3)
    gradient = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (256, 1)))  # value = column index
    centre = make_classification_eval_transform(resize_size=256, crop_size=4)(gradient.convert("RGB"))
    raw = centre[0] * STD[0] + MEAN[0]
    np.testing.assert_allclose(raw[0].numpy() * 255, [126, 127, 128, 129], atol=0.6)


def test_train_transform_shape():
    output = make_classification_train_transform(crop_size=20)(random_image(3))
    assert output.shape == (3, 20, 20)
