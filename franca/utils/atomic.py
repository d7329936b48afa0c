"""Atomic file writes and the sweep of temporaries left by killed writers: the recovery rules in one place.

Every file the framework writes (checkpoints, configs, metrics rewrites, results, exports) goes through
:func:`atomic_write`: the content goes to ``.<name>.tmp.<pid>.<token>`` in the same folder (created by ``open``, so
with the permissions the umask gives), is flushed to disk, then renamed onto ``<name>``. A reader therefore sees the
old file or the new one, never half of one. A failed write removes its temporary; a killed writer cannot, so
:func:`sweep_stale_temporaries` removes those whose process is gone (the trainer calls it on start). The token
(:func:`franca.utils.processes.process_token`) tells the writer from an unrelated process that got the same pid. A
full disk (or an exceeded quota) is reported with the file, the space it needs, the bytes written before the failure
and the space left, so the user knows how much to free.
"""

import errno
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from franca.utils.processes import process_start_time, process_token

TEMPORARY_PATTERN = re.compile(r"^\.(?P<name>.+)\.tmp\.(?P<pid>\d+)(?:\.(?P<token>[0-9a-f]{8}))?$")
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# A live process counts as the writer of a temporary without token only if it started before the file's last change
# (plus this margin for clock granularity: /proc gives start times in ticks, file systems mtimes to the second or so).
_START_MARGIN_SECONDS = 2.0


def temporary_path(path: str | os.PathLike) -> Path:
    """Where :func:`atomic_write` stages ``path``: a hidden sibling tagged with this process's id and token."""
    path = Path(path)
    pid = os.getpid()
    token = process_token(pid)
    return path.with_name(f".{path.name}.tmp.{pid}" + (f".{token}" if token else ""))


def format_bytes(size: float) -> str:
    """``size`` bytes as B, KiB, MiB or GiB with one decimal."""
    for unit in ("B", "KiB", "MiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def free_bytes(path: str | os.PathLike) -> int:
    """The free space of the file system holding ``path`` (its nearest existing folder)."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` is an ``OSError`` saying the disk is full or the user's quota is exceeded."""
    return isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS


def disk_full_words(code: int) -> tuple[str, str]:
    """What happened and its fix, for ENOSPC (a full disk) or EDQUOT (an exceeded quota)."""
    if code == errno.EDQUOT:
        return "the disk quota is exceeded", "Raise the quota or free space"
    return "no space left", "Free space"


def disk_full_message(
    path: str | os.PathLike, needed: int | None = None, written: int | None = None, code: int = errno.ENOSPC
) -> str:
    """What failed, how much it needed, how much was written and how much is free, and the fix."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    facts = []
    if written is not None:
        facts.append(f"{format_bytes(written)} were written before the disk filled")
    facts.append(f"{format_bytes(free_bytes(folder))} are free in {folder}")
    if needed:
        facts.append(f"it needs about {format_bytes(needed)}")
    what, fix = disk_full_words(code)
    advice = f"{fix} there (or point the output elsewhere) and rerun the same command"
    return f"{what} writing {path}: {'; '.join(facts)}. {advice}"


class _RecordingStream:
    """A binary stream that remembers the first ``OSError`` of its writes: ``torch.save`` turns a failed write into
    ``RuntimeError: ... unexpected pos``, and the recorded error says it was a full disk."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._stream.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as err:
            self.error = self.error or err
            raise

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def atomic_write(
    path: str | os.PathLike,
    content: bytes | str | Callable[[BinaryIO], None],
    size_hint: int | None = None,
    before_replace: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``content`` (bytes, text, or a function writing to a binary stream) to ``path`` atomically.

    ``before_replace(temporary)`` runs once the content is on disk, before the rename (e.g. to record its digest, so
    that the file never exists without its record). The temporary file is removed on any failure; a full disk or an
    exceeded quota raises ``OSError`` with a message naming the file, the space needed (``size_hint``, or the length
    of bytes and text), the bytes written and the free space.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode()
    needed = len(content) if isinstance(content, bytes) else size_hint
    temporary = temporary_path(path)
    written = 0
    recorder = None
    try:
        with open(temporary, "wb") as stream:
            recorder = _RecordingStream(stream)
            if callable(content):
                content(recorder)
            else:
                recorder.write(content)
            recorder.flush()
            written = stream.tell()
            os.fsync(stream.fileno())
        if before_replace is not None:
            before_replace(temporary)
        os.replace(temporary, path)
    except BaseException as err:
        if temporary.exists():
            written = max(written, temporary.stat().st_size)
        temporary.unlink(missing_ok=True)
        full = err if is_disk_full(err) else recorder.error if recorder and is_disk_full(recorder.error) else None
        if full is not None:
            raise OSError(full.errno, disk_full_message(path, needed, written, full.errno)) from err
        raise
    return path


def _process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _writer_alive(entry: Path, pid: int, token: str | None) -> bool:
    """Whether the process that tagged ``entry`` with ``pid`` (and ``token``) may still be writing it.

    This process counts as not running (see the sweep). With a token, the live process ``pid`` must have that token;
    without one (an older franca, or no ``/proc``), it must have started before the file last changed.
    """
    if pid == os.getpid() or not _process_alive(pid):
        return False
    if token is not None:
        own = process_token(pid)
        return own is None or own == token
    started = process_start_time(pid)
    try:
        changed = entry.lstat().st_mtime
    except FileNotFoundError:
        return False
    return started is None or started <= changed + _START_MARGIN_SECONDS


def sweep_stale_temporaries(folder: str | os.PathLike, extra_patterns: tuple[re.Pattern, ...] = ()) -> list[Path]:
    """Remove the temporaries in ``folder`` whose writer is gone, and every entry matching ``extra_patterns``.

    ``.<name>.tmp.<pid>[.<token>]`` files are removed when their writer is gone: no process ``pid`` runs on this
    machine, or the one that runs is another process (another token, or started after the file's last change). Call
    it before this process writes anything: a temporary tagged with this process's own pid is then the leftover of an
    earlier process that had the same pid (containers restart with the same pids), so it goes too.
    ``extra_patterns`` name temporaries without a pid that the caller knows to be stale, such as the DCP staging
    folders at the start of a run. Returns what was removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        match = TEMPORARY_PATTERN.match(entry.name)
        stale = (match is not None and not _writer_alive(entry, int(match["pid"]), match["token"])) or any(
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
