"""Atomic file writes and the sweep of temporaries left by killed writers: the recovery rules in one place.

Every file the framework writes (checkpoints, configs, metrics rewrites, results, exports) goes through
:func:`atomic_write`: the content goes to ``.<name>.tmp.<pid>`` in the same folder (created by ``open``, so with the
permissions the umask gives), is flushed to disk, then renamed onto ``<name>``. A reader therefore sees the old
file or the new one, never half of one. A failed write removes its temporary; a killed writer cannot, so
:func:`sweep_stale_temporaries` removes those whose process is gone (the trainer calls it on start). A full disk is
reported with the folder, the bytes written before the failure and the space left, so the user knows how much to
free.
"""

import errno
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMPORARY_PATTERN = re.compile(r"^\.(?P<name>.+)\.tmp\.(?P<pid>\d+)$")


def temporary_path(path: str | os.PathLike) -> Path:
    """Where :func:`atomic_write` stages ``path``: a hidden sibling tagged with this process id."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def disk_full_message(path: Path, written: int) -> str:
    free = shutil.disk_usage(path.parent).free
    return (
        f"no space left writing {path}: {written / 2**20:.1f} MiB were written before the disk filled and "
        f"{free / 2**20:.1f} MiB are free in {path.parent}; the file needs more than that. Free space there (or "
        "point the output elsewhere) and rerun the same command"
    )


def atomic_write(path: str | os.PathLike, content: bytes | str | Callable[[BinaryIO], None]) -> Path:
    """Write ``content`` (bytes, text, or a function writing to a binary stream) to ``path`` atomically.

    The temporary file is removed on any failure; a full disk raises ``OSError(ENOSPC)`` with a message naming the
    folder, the bytes written and the free space.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    written = 0
    try:
        with open(temporary, "wb") as stream:
            if callable(content):
                content(stream)
            else:
                stream.write(content.encode() if isinstance(content, str) else content)
            stream.flush()
            written = stream.tell()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except OSError as err:
        if temporary.exists():
            written = max(written, temporary.stat().st_size)
        temporary.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, disk_full_message(path, written)) from err
        raise
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def _process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine; this process counts as not running (see the sweep)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temporaries(folder: str | os.PathLike, extra_patterns: tuple[re.Pattern, ...] = ()) -> list[Path]:
    """Remove the temporaries in ``folder`` whose writer is gone, and every entry matching ``extra_patterns``.

    ``.<name>.tmp.<pid>`` files are removed when no process ``pid`` runs on this machine (a live one may still be
    writing). Call it before this process writes anything: a temporary tagged with this process's own pid is then the
    leftover of an earlier process that had the same pid (containers restart with the same pids), so it goes too.
    ``extra_patterns`` name temporaries without a pid that the caller knows to be stale, such as the DCP staging
    folders at the start of a run. Returns what was removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        match = TEMPORARY_PATTERN.match(entry.name)
        stale = (match is not None and not _process_alive(int(match["pid"]))) or any(
            pattern.match(entry.name) for pattern in extra_patterns
        )
        if not stale:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
