"""An exclusive, OS-level lock on a folder, held by one process and released by the kernel when that process dies.

The lock is ``fcntl.flock`` on ``<folder>/.lock``, opened for the whole time it is held. The holder writes who it is
(host, pid, start time, SLURM job) into that file, so a process that finds the folder locked can name the holder. The
file is never deleted: a process that opened it before the deletion would lock the deleted file while a newcomer
locks a new one, and both would run. After locking, the holder checks that the file it locked is still the one at
the path, so a file deleted by hand is noticed.

Shared file systems (training.md, "Output folder"): on NFS, Linux turns ``flock`` into an NFS byte-range lock that
every client sees (v4, or v3 with the lock daemon; a ``nolock`` mount keeps it on one machine). On Lustre it holds
across nodes only with the ``flock`` mount option (``localflock``: one node only; neither: ``flock`` fails). Where
the file system refuses ``flock``, a warning says so and the folder is used unlocked.

A process may lock the same folder again (it gets the lock it holds); :func:`release_folder_lock` releases it.
"""

import errno
import fcntl
import json
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

LOCK_FILE = ".lock"
UNSUPPORTED_ERRNOS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class FolderBusyError(RuntimeError):
    """The folder is locked by another process."""


@dataclass
class FolderLock:
    """A held lock: the folder, the open lock file (None when the file system cannot lock) and the holder record."""

    folder: Path
    fd: int | None
    holder: dict


_HELD: dict[str, FolderLock] = {}


def describe_holder(holder: dict) -> str:
    """``host <h>, pid <p>, started <time>[, SLURM job <j>]`` from a holder record (missing fields left out)."""
    labels = {"host": "host", "pid": "pid", "started": "started", "slurm_job": "SLURM job"}
    parts = [f"{label} {holder[key]}" for key, label in labels.items() if holder.get(key)]
    return ", ".join(parts) or "holder unknown (its record is empty)"


def this_process() -> dict:
    """The holder record of this process."""
    record = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    if os.environ.get("SLURM_JOB_ID"):
        record["slurm_job"] = os.environ["SLURM_JOB_ID"]
    return record


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _same_file(fd: int, path: Path) -> bool:
    try:
        here = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


def acquire_folder_lock(folder: str | os.PathLike, holder: dict | None = None) -> FolderLock:
    """Lock ``folder`` (created if missing) for this process, or raise :class:`FolderBusyError` naming the folder
    and the holder. Never waits."""
    folder = Path(folder)
    key = os.path.realpath(folder)
    if key in _HELD:
        return _HELD[key]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            found = _read_holder(fd)
            os.close(fd)
            raise FolderBusyError(
                f"{folder} is in use by another run ({describe_holder(found)}); one run writes a folder at a time. "
                "Wait for it to end or stop it, or give this run another --output-dir"
            ) from None
        except OSError as err:
            os.close(fd)
            if err.errno not in UNSUPPORTED_ERRNOS:
                raise
            warnings.warn(
                f"cannot lock {path} ({err.strerror}): this file system does not support flock, so a second run in "
                f"{folder} would not be stopped (training.md, 'Output folder')",
                UserWarning,
                stacklevel=2,
            )
            lock = _HELD[key] = FolderLock(folder, None, holder or this_process())
            return lock
        if _same_file(fd, path):
            break
        os.close(fd)  # deleted or replaced between open and lock: lock the file that is there now
    record = holder or this_process()
    data = json.dumps(record).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
    lock = _HELD[key] = FolderLock(folder, fd, record)
    return lock


def release_folder_lock(folder: str | os.PathLike) -> None:
    """Release this process's lock on ``folder`` (nothing when it holds none); the lock file stays."""
    lock = _HELD.pop(os.path.realpath(folder), None)
    if lock is not None and lock.fd is not None:
        fcntl.flock(lock.fd, fcntl.LOCK_UN)
        os.close(lock.fd)


def release_all_folder_locks() -> None:
    """Release every folder lock this process holds."""
    for key in list(_HELD):
        release_folder_lock(key)
