"""VOC and COCO dataset strings on tiny folder layouts built from real photos (scikit-image)."""

import numpy as np
import pytest
from eval_data import SEGMENTATION_PHOTOS, class_mask, make_voc, photo

from franca.data import make_dataset
from franca.data.datasets.coco import COCOImages
from franca.data.datasets.voc import VOCSegmentation


def test_voc_val_gives_images_and_palette_indices(tmp_path):
    make_voc(tmp_path)
    dataset = make_dataset(f"VOC:root={tmp_path}:split=val")
    assert isinstance(dataset, VOCSegmentation) and len(dataset) == 2
    image, mask = dataset[1]
    assert image.mode == "RGB" and image.size == (48, 48)
    assert mask.mode == "L"
    np.testing.assert_array_equal(np.asarray(mask), class_mask(3))  # palette indices, not colours


def test_voc_trainaug_reads_the_augmented_masks(tmp_path):
    make_voc(tmp_path)
    dataset = make_dataset(f"VOC:root={tmp_path}:split=trainaug")
    assert len(dataset) == 4
    np.testing.assert_array_equal(np.asarray(dataset[2][1]), class_mask(102))


def test_voc_images_only_mode(tmp_path):
    make_voc(tmp_path)
    dataset = make_dataset(f"VOC:root={tmp_path}:split=train:masks=false")
    assert [dataset[i][1] for i in range(len(dataset))] == [-1, -1]


def test_voc_errors_name_the_fix(tmp_path):
    make_voc(tmp_path, with_aug=False)
    with pytest.raises(FileNotFoundError, match="trainaug.txt"):
        make_dataset(f"VOC:root={tmp_path}:split=trainaug")
    with pytest.raises(ValueError, match="split='test'"):
        make_dataset(f"VOC:root={tmp_path}:split=test")
    with pytest.raises(ValueError, match="masks=true or masks=false"):
        make_dataset(f"VOC:root={tmp_path}:split=val:masks=maybe")
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        make_dataset(f"VOC:root={tmp_path / 'ImageSets'}:split=val")
    (tmp_path / "SegmentationClass" / "2007_000003.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 listed files are missing"):
        make_dataset(f"VOC:root={tmp_path}:split=val")
    assert len(make_dataset(f"VOC:root={tmp_path}:split=val:masks=false")) == 2


def test_coco_split_images_unlabelled(tmp_path):
    (tmp_path / "val2017").mkdir()
    for i, name in enumerate(SEGMENTATION_PHOTOS[:3]):
        photo(name).save(tmp_path / "val2017" / f"{i:012d}.jpg")
    dataset = make_dataset(f"COCO:root={tmp_path}:split=val2017")
    assert isinstance(dataset, COCOImages) and len(dataset) == 3
    image, target = dataset[0]
    assert target == -1
    np.testing.assert_allclose(
        np.asarray(image, dtype=float).mean(), np.asarray(photo(SEGMENTATION_PHOTOS[0]), float).mean(), atol=3
    )
    with pytest.raises(FileNotFoundError, match="train2017"):
        make_dataset(f"COCO:root={tmp_path}:split=train2017")
    with pytest.raises(ValueError, match="split='test2017'"):
        make_dataset(f"COCO:root={tmp_path}:split=test2017")
    (tmp_path / "train2017").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        make_dataset(f"COCO:root={tmp_path}:split=train2017")
