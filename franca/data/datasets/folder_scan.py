"""Listing the image files below a folder safely: each real directory once, regular files only, skips reported.

Policy (dataset_prep.md, "Folder scans"):

* **Links to directories** are followed, each real directory at most once. Real directories are listed first (at
  their own path), then the directories reached only through links, so a link into the tree, a second link to the same
  folder or a loop (``a/loop -> ..``) adds nothing, and the listing always ends.
* **Only regular files** (or links to them) are listed: a named pipe, socket or device with an image extension would
  block or flood a reader, so it is skipped, and so is a broken link.
* One warning (:class:`FolderScanWarning`) reports, in one line, how many entries were skipped and why. Unreadable
  directories (no permission) count as skipped too.

Names are used as the file system gives them: bytes that are not UTF-8 become surrogate escapes, which ``open``
turns back into the same bytes.
"""

import os
import stat
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from franca.data.datasets.files import is_image_file

REPEATED_DIRECTORY = "link(s) to a directory already listed (a loop or a second link)"
NOT_REGULAR = "not a regular file (a named pipe, socket or device)"
BROKEN_LINK = "broken link(s)"
UNREADABLE_DIRECTORY = "unreadable director(ies)"


class FolderScanWarning(UserWarning):
    """A folder scan skipped entries (links to directories already listed, non-regular files, broken links)."""


@dataclass
class ScanReport:
    """What a scan skipped, by reason; :meth:`warn` reports it in one line."""

    skipped: Counter = field(default_factory=Counter)

    def warn(self, what: str, root: str | os.PathLike, listed: int) -> None:
        if not self.skipped:
            return
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
        warnings.warn(
            f"{what} {str(root)!r}: listed {listed} image(s), skipped {sum(self.skipped.values())} entries: {reasons}",
            FolderScanWarning,
            stacklevel=3,
        )


def _identity(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _list_directory(
    directory: str, relative: str, visited: set, links: list, report: ScanReport, recursive: bool
) -> list[str]:
    """The image files of ``directory`` (and its real sub-directories when ``recursive``); links to directories
    are appended to ``links`` as (path, relative path) for later."""
    try:
        with os.scandir(directory) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
    except OSError:
        report.skipped[UNREADABLE_DIRECTORY] += 1
        return []
    found = []
    for entry in entries:
        name = f"{relative}/{entry.name}" if relative else entry.name
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
        except OSError:
            is_dir = False
        if is_dir:
            if not recursive:
                continue
            if entry.is_symlink():
                links.append((entry.path, name))
                continue
            identity = _identity(entry.path)
            if identity is None or identity in visited:
                report.skipped[REPEATED_DIRECTORY] += 1
                continue
            visited.add(identity)
            found += _list_directory(entry.path, name, visited, links, report, recursive)
        elif is_image_file(entry.name):
            try:
                mode = entry.stat(follow_symlinks=True).st_mode
            except OSError:
                report.skipped[BROKEN_LINK] += 1
                continue
            if stat.S_ISREG(mode):
                found.append(name)
            else:
                report.skipped[NOT_REGULAR] += 1
    return found


def scan_image_files(
    directory: str | os.PathLike, recursive: bool = True, what: str = "image folder", report: ScanReport | None = None
) -> list[str]:
    """Paths (relative to ``directory``, '/'-separated, sorted) of the image files below it, by the module's policy.

    Skipped entries are added to ``report`` when one is given (the caller warns once for several scans); otherwise
    this scan warns itself, naming ``what``.
    """
    own_report = report is None
    report = report or ScanReport()
    root = os.fspath(directory)
    visited = {_identity(root)}
    links: list[tuple[str, str]] = []
    found = _list_directory(root, "", visited, links, report, recursive)
    while links:
        path, name = links.pop(0)
        identity = _identity(path)
        if identity is None or identity in visited:
            report.skipped[REPEATED_DIRECTORY] += 1
            continue
        visited.add(identity)
        found += _list_directory(path, name, visited, links, report, recursive)
    found.sort()
    if own_report:
        report.warn(what, directory, len(found))
    return found


def image_paths_in(directory: Path, what: str, suffixes: tuple[str, ...] | None = None) -> list[Path]:
    """The image files directly in ``directory`` (regular files only, sorted), optionally only those whose suffix is
    in ``suffixes``; skips are warned about in one line naming ``what``."""
    names = scan_image_files(directory, recursive=False, what=what)
    return [directory / name for name in names if suffixes is None or Path(name).suffix in suffixes]
