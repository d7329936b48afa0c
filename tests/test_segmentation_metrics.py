"""Segmentation metrics, mask helpers and segmentation datasets against brute-force references (the tiny photo-grid
segmentation set is built by ``eval_data.make_tile_segfolder``)."""

import numpy as np
import pytest
import torch
from eval_data import IMAGENET_MEAN, IMAGENET_STD, make_tile_segfolder
from PIL import Image
from skimage import data as skdata

from franca.data.datasets.ade20k import ADE20K
from franca.data.datasets.segmentation_folder import SegFolder
from franca.data.loaders import make_dataset
from franca.eval.lib.segmentation import (
    SegmentationTransform,
    confusion_matrix,
    patch_label_distribution,
    resize_mask_nearest,
    segmentation_metrics,
)


# ------------------------------------------------------------------------------------------------------ metrics
def brute_force_metrics(prediction: np.ndarray, target: np.ndarray, num_classes: int, ignore: int = 255):
    ious, correct, total = [], 0, 0
    for p, t in zip(prediction.ravel(), target.ravel()):
        if t != ignore:
            total += 1
            correct += int(p == t)
    for c in range(num_classes):
        tp = fp = fn = 0
        for p, t in zip(prediction.ravel(), target.ravel()):
            if t == ignore:
                continue
            tp += int(p == c and t == c)
            fp += int(p == c and t != c)
            fn += int(p != c and t == c)
        if tp + fp + fn:
            ious.append(tp / (tp + fp + fn))
    return 100 * sum(ious) / len(ious), 100 * correct / total, len(ious)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_miou_and_pixel_accuracy_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    num_classes = 7
    target = rng.integers(0, 5, size=(3, 11, 13))  # classes 5 and 6 never in the ground truth
    target[rng.random(target.shape) < 0.2] = 255
    prediction = np.where(rng.random(target.shape) < 0.6, target % 255, rng.integers(0, 6, size=target.shape))
    prediction[prediction == 255] = 0  # class 6 in neither: excluded; class 5 predicted only: IoU 0, included
    metrics = segmentation_metrics(
        confusion_matrix(torch.from_numpy(prediction), torch.from_numpy(target), num_classes)
    )
    miou, accuracy, evaluated = brute_force_metrics(prediction, target, num_classes)
    assert metrics["mIoU"] == pytest.approx(miou, abs=1e-9)
    assert metrics["pixel_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert metrics["num_classes_evaluated"] == evaluated
    assert metrics["per_class_IoU"][6] is None
    assert metrics["num_pixels"] == int((target != 255).sum())


def test_confusion_matrix_counts_and_errors():
    target = torch.tensor([[0, 1, 255], [2, 2, 1]])
    prediction = torch.tensor([[0, 2, 1], [2, 1, 1]])
    expected = torch.zeros(3, 3, dtype=torch.int64)
    for t, p in [(0, 0), (1, 2), (2, 2), (2, 1), (1, 1)]:
        expected[t, p] += 1
    assert torch.equal(confusion_matrix(prediction, target, 3), expected)
    with pytest.raises(ValueError, match=r"outside \[0, 2\).*--num-classes"):
        confusion_matrix(prediction, target, 2)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(prediction[:1], target, 3)


# -------------------------------------------------------------------------------------------------------- masks
def test_resize_mask_nearest_picks_floor_indices():
    mask = torch.randint(0, 9, (2, 7, 10))
    out = resize_mask_nearest(mask, (4, 15))
    for i in range(4):
        for j in range(15):
            assert torch.equal(out[:, i, j], mask[:, (i * 7) // 4, (j * 10) // 15])
    assert out.dtype == mask.dtype


def test_patch_label_distribution_matches_loops():
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 4, size=(2, 8, 12))
    mask[0, :4, :4] = 255  # one fully ignored patch
    mask[1, 4:, 8:][rng.random((4, 4)) < 0.5] = 255
    distribution = patch_label_distribution(torch.from_numpy(mask), 4, 4).numpy()
    assert distribution.shape == (2, 2, 3, 4)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                pixels = mask[b, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].ravel()
                pixels = pixels[pixels != 255]
                expected = np.array([(pixels == c).sum() for c in range(4)], float)
                if len(pixels):
                    np.testing.assert_allclose(distribution[b, i, j], expected / len(pixels), atol=1e-6)
                else:
                    assert distribution[b, i, j].sum() == 0


def test_segmentation_transform_sizes_and_normalisation():
    image = Image.fromarray(skdata.astronaut()).resize((60, 40))
    mask = torch.randint(0, 3, (40, 60))
    x, m = SegmentationTransform((32, 48), (10, 10))(image, mask)
    assert x.shape == (3, 32, 48) and m.shape == (10, 10) and m.dtype == torch.int64
    x, m = SegmentationTransform((40, 60), None)(image, mask)
    expected = (np.asarray(image) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), expected, atol=1e-5)
    assert torch.equal(m, mask)
    x, m = SegmentationTransform((16, 16), (16, 16), augment=True)(image, mask)
    assert x.shape == (3, 16, 16) and m.shape == (16, 16) and set(m.unique().tolist()) <= {0, 1, 2}


# ----------------------------------------------------------------------------------------------------- datasets
def test_segfolder_reads_pairs_and_counts_classes(tmp_path):
    root = make_tile_segfolder(tmp_path / "seg", tile=16, n_train=2, n_val=1)
    dataset = make_dataset(f"SegFolder:root={root}:split=val")
    image, mask = dataset[0]
    assert image.size == (32, 32) and mask.shape == (32, 32) and mask.dtype == torch.int64
    expected = np.array(Image.open(root / "val" / "masks" / "img0.png"))
    assert torch.equal(mask, torch.from_numpy(expected.astype(np.int64)))
    assert dataset.num_classes == 4  # max label 3 over all splits, 255 not counted
    (root / "classes.txt").write_text("a\nb\nc\nd\ne\n")
    assert SegFolder(str(root), "val").num_classes == 5


def test_segfolder_errors(tmp_path):
    root = make_tile_segfolder(tmp_path / "seg", tile=16, n_train=2, n_val=1)
    (root / "train" / "masks" / "img1.png").unlink()
    with pytest.raises(FileNotFoundError, match="have no mask"):
        SegFolder(str(root), "train")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "val" / "masks" / "img0.png")
    with pytest.raises(ValueError, match="single-channel label image"):
        SegFolder(str(root), "val")[0]


def test_ade20k_shifts_labels_and_ignores_zero(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
    raw = np.array([[0, 1, 2], [150, 7, 0]], np.uint8)
    Image.fromarray(skdata.coffee()[:2, :3]).save(root / "images" / "validation" / "ADE_val_1.jpg")
    Image.fromarray(raw, mode="L").save(root / "annotations" / "validation" / "ADE_val_1.png")
    dataset = make_dataset(f"ADE20K:root={root}:split=validation")
    _, mask = dataset[0]
    assert mask.tolist() == [[255, 0, 1], [149, 6, 255]]
    assert dataset.num_classes == ADE20K.num_classes == 150
    with pytest.raises(ValueError, match="split='val' is not one of training, validation"):
        ADE20K(str(root), "val")
