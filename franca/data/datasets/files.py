"""File-system helpers shared by the datasets: directory checks, image-file scanning, cached file indexes."""

import os
from pathlib import Path
from typing import Callable

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


def scan_image_files(directory: Path) -> list[str]:
    """Paths (relative to ``directory``, '/'-separated, sorted) of all image files below it, following links."""
    found = []
    for current, subdirectories, files in os.walk(directory, followlinks=True):
        subdirectories.sort()
        relative = Path(current).relative_to(directory)
        found.extend((relative / name).as_posix() for name in sorted(files) if is_image_file(name))
    return sorted(found)


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
