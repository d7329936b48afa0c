"""Data for pretraining and evaluation: datasets and dataset strings, multi-crop augmentation, masking, collate,
deterministic loaders."""

from franca.data.augmentations import (
    DataAugmentationDINO,
    make_classification_eval_transform,
    make_classification_train_transform,
)
from franca.data.batched_augmentations import SplitDataAugmentationDINO, apply_photometric, apply_photometric_to_batch
from franca.data.collate import MaskingCollator, collate_data_and_cast
from franca.data.datasets import (
    FashionMNIST,
    ImageFolder,
    ImageNet,
    ImageNet22k,
    TooManyUnreadableImagesError,
    UnreadableImageWarning,
    register_dataset,
)
from franca.data.loaders import make_dataset, make_eval_data_loader, make_train_data_loader, parse_dataset_string
from franca.data.masking import BlockMask, CyclicMask, InverseBlockMask, build_mask_generator
from franca.data.samplers import InfiniteSampleKeySampler, SampleKey

__all__ = [
    "BlockMask",
    "CyclicMask",
    "DataAugmentationDINO",
    "FashionMNIST",
    "ImageFolder",
    "ImageNet",
    "ImageNet22k",
    "InfiniteSampleKeySampler",
    "InverseBlockMask",
    "MaskingCollator",
    "SampleKey",
    "SplitDataAugmentationDINO",
    "TooManyUnreadableImagesError",
    "UnreadableImageWarning",
    "apply_photometric",
    "apply_photometric_to_batch",
    "build_mask_generator",
    "collate_data_and_cast",
    "make_classification_eval_transform",
    "make_classification_train_transform",
    "make_dataset",
    "make_eval_data_loader",
    "make_train_data_loader",
    "parse_dataset_string",
    "register_dataset",
]
