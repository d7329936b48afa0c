"""``FashionMNIST``: Zalando's Fashion-MNIST read from its original idx files (gzipped or not).

Files in ``root``: ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]`` and the ``t10k-*`` pair for
the test split. Without a root, Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) is used
when it holds the split, else the subset shipped in ``franca/assets/fashion_mnist`` (400 train and 100 test images
per class); ``root="bundled"`` forces the shipped subset.
"""

import gzip
import os
from pathlib import Path
from typing import IO, Callable

import numpy as np
from PIL import Image

from franca.data.datasets.base import ImageDataset
from franca.data.datasets.files import require_directory

SYSTEM_ROOT = Path("/usr/share/datasets/fashion-mnist")
BUNDLED_ROOT = Path(__file__).resolve().parents[2] / "assets" / "fashion_mnist"
BUNDLED = "bundled"
SPLIT_PREFIXES = {"train": "train", "test": "t10k"}
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# idx type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT") → big-endian numpy dtypes.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in an idx file (magic: two zero bytes, a type code, the number of dimensions)."""
    path = Path(path)
    with _open(path) as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError(f"{str(path)!r} is not an idx file (bad magic {data[:4]!r}); expected Fashion-MNIST files")
    dtype, ndim = np.dtype(IDX_DTYPES[data[2]]), data[3]
    shape = tuple(int(size) for size in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    payload_offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - payload_offset != expected:
        raise ValueError(
            f"idx file {str(path)!r} declares shape {shape} ({expected} bytes) but holds {len(data) - payload_offset}"
            " bytes of data; the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=dtype, offset=payload_offset).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes ``array`` as an idx file, gzipped (with a zero timestamp, for reproducible bytes) if ``path`` ends .gz."""
    codes = {np.dtype(dtype).newbyteorder("="): code for code, dtype in IDX_DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"idx cannot store dtype {array.dtype}; use one of {sorted(map(str, codes))}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=array.dtype.newbyteorder(">")).tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def _find_idx_file(root: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz"):
        if (root / name).is_file():
            return root / name
    return None


def split_files(root: Path, split: str) -> tuple[Path, Path] | None:
    """The (images, labels) idx files of ``split`` in ``root``, or None when either is missing."""
    prefix = SPLIT_PREFIXES[split]
    images = _find_idx_file(root, f"{prefix}-images-idx3-ubyte")
    labels = _find_idx_file(root, f"{prefix}-labels-idx1-ubyte")
    return None if images is None or labels is None else (images, labels)


def resolve_root(root: str | None, split: str) -> Path:
    """``root`` itself; ``"bundled"`` → the shipped subset; None → the Debian copy if it has ``split``, else bundled."""
    if root == BUNDLED:
        return BUNDLED_ROOT
    if root is not None:
        return Path(root).expanduser()
    return SYSTEM_ROOT if split_files(SYSTEM_ROOT, split) is not None else BUNDLED_ROOT


class FashionMNIST(ImageDataset):
    """Fashion-MNIST ``split`` = ``train`` or ``test``: 28×28 photos (returned as RGB) and labels 0–9."""

    def __init__(
        self,
        root: str | None = None,
        split: str = "train",
        transform: Callable | None = None,
        target_transform: Callable | None = None,
    ):
        self.split = str(split).lower()
        if self.split not in SPLIT_PREFIXES:
            raise ValueError(f"FashionMNIST split={split!r} is unknown; choose one of {', '.join(SPLIT_PREFIXES)}")
        directory = require_directory(resolve_root(root, self.split), "FashionMNIST root")
        super().__init__(str(directory), transform, target_transform)
        files = split_files(directory, self.split)
        if files is None:
            prefix = SPLIT_PREFIXES[self.split]
            raise FileNotFoundError(
                f"FashionMNIST {self.split}: {str(directory)!r} lacks {prefix}-images-idx3-ubyte[.gz] or "
                f"{prefix}-labels-idx1-ubyte[.gz]; point root= at the folder holding the original idx files"
            )
        self.images, self.labels = read_idx(files[0]), read_idx(files[1])
        if self.images.ndim != 3 or self.labels.ndim != 1 or len(self.images) != len(self.labels):
            raise ValueError(
                f"FashionMNIST {self.split} in {str(directory)!r}: images {self.images.shape} and labels "
                f"{self.labels.shape} do not form N×H×W images with N labels"
            )
        self.classes = list(CLASS_NAMES)

    def __len__(self) -> int:
        return len(self.labels)

    def read_image(self, index: int) -> Image.Image:
        return Image.fromarray(np.ascontiguousarray(self.images[index], dtype=np.uint8)).convert("RGB")

    def get_target(self, index: int) -> int:
        return int(self.labels[index])

    def describe(self, index: int) -> str:
        return f"{self.root} [{self.split} image {index}]"
