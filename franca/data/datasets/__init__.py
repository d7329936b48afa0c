"""Image datasets returning (RGB PIL image, target or -1), and the registry used by dataset strings."""

from franca.data.datasets.ade20k import ADE20K  # noqa: E402  (segmentation datasets register themselves)
from franca.data.datasets.base import (
    FileListDataset,
    ImageDataset,
    ReadFailureCounter,
    TooManyUnreadableImagesError,
    UnreadableImageWarning,
    decode_image,
)
from franca.data.datasets.coco import COCOImages  # noqa: E402
from franca.data.datasets.fashion_mnist import FashionMNIST, read_idx, write_idx
from franca.data.datasets.folder_scan import FolderScanWarning
from franca.data.datasets.image_folder import ImageFolder
from franca.data.datasets.image_net import ImageNet
from franca.data.datasets.image_net_22k import ImageNet22k
from franca.data.datasets.registry import DatasetSpec, get_dataset_spec, register_dataset, registered_dataset_names
from franca.data.datasets.segmentation_folder import SegFolder, SegmentationDataset  # noqa: E402
from franca.data.datasets.voc import VOCSegmentation  # noqa: E402
from franca.data.datasets.webdataset import WebDatasetShards  # noqa: E402

register_dataset("ImageNet", ImageNet, keys=("split", "root", "extra"), required_keys=("split", "root"))
register_dataset("ImageNet22k", ImageNet22k, keys=("root", "extra"), required_keys=("root",))
register_dataset("ImageFolder", ImageFolder, keys=("root",), required_keys=("root",))
register_dataset("FashionMNIST", FashionMNIST, keys=("root", "split"))

__all__ = [
    "ADE20K",
    "COCOImages",
    "SegFolder",
    "SegmentationDataset",
    "VOCSegmentation",
    "WebDatasetShards",
    "DatasetSpec",
    "FashionMNIST",
    "FileListDataset",
    "FolderScanWarning",
    "ImageDataset",
    "ImageFolder",
    "ImageNet",
    "ImageNet22k",
    "ReadFailureCounter",
    "TooManyUnreadableImagesError",
    "UnreadableImageWarning",
    "decode_image",
    "get_dataset_spec",
    "read_idx",
    "register_dataset",
    "registered_dataset_names",
    "write_idx",
]
