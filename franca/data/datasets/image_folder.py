"""``ImageFolder``: a user's own folder of images, with or without class sub-folders (design.md, dataset strings)."""

from typing import Callable

import numpy as np

from franca.data.datasets.base import FileListDataset
from franca.data.datasets.files import require_directory
from franca.data.datasets.folder_scan import scan_image_files


class ImageFolder(FileListDataset):
    """All images below ``root`` (recursive, common extensions, sorted paths).

    Labelled when every image lies inside a top-level sub-folder: the label is the index of that sub-folder in
    sorted order (``classes``). If any image lies directly in ``root`` the folder is treated as unlabelled and every
    target is -1.
    """

    def __init__(self, root: str, transform: Callable | None = None, target_transform: Callable | None = None):
        directory = require_directory(root, "ImageFolder root")
        paths = scan_image_files(directory, what="ImageFolder")
        if not paths:
            raise FileNotFoundError(
                f"ImageFolder found no image files below {root!r}; expected e.g. .jpg/.png files, optionally in one "
                "sub-folder per class"
            )
        labelled = all("/" in path for path in paths)
        top_folders = [path.split("/", 1)[0] for path in paths] if labelled else []
        self.classes = sorted(set(top_folders))
        class_index = {name: index for index, name in enumerate(self.classes)}
        targets = np.array([class_index[name] for name in top_folders], dtype=np.int64) if labelled else None
        super().__init__(root, directory, np.array(paths), targets, transform, target_transform)
