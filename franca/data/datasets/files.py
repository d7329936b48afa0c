"""File-system helpers shared by the datasets: directory checks, image file names, opening regular files only,
cached file indexes (scanning folders: :mod:`franca.data.datasets.folder_scan`)."""

import os
import stat
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

from franca.utils.atomic import atomic_write

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)


def require_directory(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path; FileNotFoundError naming ``what`` and the path when it is not a directory."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: directory {str(path)!r} does not exist; pass the right root=<path>")
    return path


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def open_regular_file(path: str | os.PathLike) -> BinaryIO:
    """``path`` opened for binary reading, or ``OSError`` when it is not a regular file. The open does not block (a
    named pipe would wait for a writer forever), and the check is on what was opened, so a file swapped for a pipe
    after a folder scan is refused too."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a named pipe" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "a device"
            raise OSError(f"{os.fsdecode(path)} is {kind}, not a regular file; only regular files are read")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def load_or_build_index(
    extra: str | os.PathLike | None, filename: str, build: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """The arrays of ``extra/filename`` (a .npz) if it exists, else ``build()``, written there when ``extra`` is set.

    The file is written to a temporary name and renamed, so concurrent ranks never read a partial index.
    """
    if extra is None:
        return build()
    path = Path(extra).expanduser() / filename
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as cached:
                return {name: cached[name] for name in cached.files}
        except (OSError, ValueError) as error:
            raise ValueError(
                f"cannot read the cached file index {str(path)!r} ({error}); delete it to rebuild it from the data"
            ) from error
    arrays = build()
    atomic_write(path, lambda stream: np.savez(stream, **arrays))
    return arrays
