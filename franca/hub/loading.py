"""Safe reading of checkpoint files, folders and URLs (design: "Safe loading").

- ``.pth`` files are read with ``torch.load(weights_only=True)``: a pickle that would run code is refused, and a
  truncated or damaged file is reported with its path, its size and what is wrong.
- URLs are downloaded into torch.hub's cache (``$TORCH_HOME/hub/checkpoints``) and trusted on first use: the SHA-256
  of each download is recorded beside it in ``<file>.sha256`` (``sha256sum`` format), and every later load checks the
  cached file against the published digest when the registry has one, else against that record. A cached file with
  no digest to check (put there by hand or by an older version), with a mismatching digest, or that cannot be read is
  moved aside to ``<file>.untrusted-<time>`` (never deleted) and downloaded again; a fresh download that does not
  match is deleted and refused.
- The ViT-g release is split into ``.tar.gz`` parts: they are joined and the ``.pth`` inside is extracted with
  ``tarfile``'s ``"data"`` filter (no links, devices or paths outside the target folder); the extracted file is
  cached and checked like a download.
- A safetensors export is either a bare ``.safetensors`` file or a folder with ``model.safetensors`` and
  ``config.json`` (``{"arch": <name in ARCHITECTURES or null>, <DinoVisionTransformer keyword>: value, ...}``).
"""

import json
import os
import shutil
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from franca.models.safetensors_folder import CONFIG_FILE, WEIGHTS_FILE
from franca.utils.atomic import atomic_write, temporary_path
from franca.utils.digest import SHA256_PATTERN, file_sha256
from franca.utils.weight_files import (
    RefusedPickleError,
    UnreadableCheckpointError,
    describe_failure,
    load_torch_file,
    unreadable,
)

SHA256_RECORD_SUFFIX = ".sha256"
UNTRUSTED_INFIX = ".untrusted-"


def is_url(value: str) -> bool:
    return urlparse(str(value)).scheme in ("http", "https")


def hub_checkpoint_dir() -> Path:
    """torch.hub's checkpoint cache (follows ``$TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


# ---------------------------------------------------------------------------------------------------------------------
# Reading files


def _load_safetensors(path: Path) -> dict:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as err:
        raise ImportError(
            f"reading {path} needs the 'safetensors' package: pip install safetensors (or franca[export])"
        ) from err
    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as err:
        raise unreadable(path, describe_failure(err)) from err


def read_export_config(folder: str | os.PathLike) -> dict:
    """The ``config.json`` of a safetensors export folder (ViT constructor keywords and ``arch``)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is a folder but has no {CONFIG_FILE} (a safetensors export needs one)")
    with open(path) as handle:
        config = json.load(handle)
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object of ViT keywords, got {type(config).__name__}")
    return config


def _read_checkpoint(path: Path) -> dict:
    """A ``.pth`` file, ``.safetensors`` file or safetensors export folder, as a dict on CPU."""
    if path.is_dir():
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{path} is a folder without {WEIGHTS_FILE} (not a safetensors export)")
        read_export_config(path)
        return _load_safetensors(weights)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    return load_torch_file(path)


# ---------------------------------------------------------------------------------------------------------------------
# SHA-256 records and untrusted cached files


def sha256_record_path(path: Path) -> Path:
    """Where the digest of a cached file is recorded: ``<file>.sha256``."""
    return path.with_name(path.name + SHA256_RECORD_SUFFIX)


def read_recorded_sha256(path: Path) -> str | None:
    """The digest recorded beside ``path``, or None when there is no record or it does not hold a SHA-256."""
    record = sha256_record_path(path)
    if not record.is_file():
        return None
    fields = record.read_text().split()
    digest = fields[0].lower() if fields else ""
    return digest if SHA256_PATTERN.fullmatch(digest) else None


def garbled_sha256_record(path: Path) -> str | None:
    """The start of the record beside ``path`` when it exists but holds no SHA-256 (None otherwise)."""
    record = sha256_record_path(path)
    if not record.is_file() or read_recorded_sha256(path) is not None:
        return None
    return record.read_bytes()[:64].decode(errors="replace")


def _record_sha256(path: Path, digest: str) -> None:
    """Write ``<digest>  <name>`` beside ``path``: ``sha256sum -c <file>.sha256`` checks it by hand."""
    atomic_write(sha256_record_path(path), f"{digest}  {path.name}\n")


def _move_aside(path: Path, with_record: bool) -> Path:
    """Rename ``path`` (and its record) to ``<name>.untrusted-<time>``: a cached file is never deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}{UNTRUSTED_INFIX}{stamp}")
    counter = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}{UNTRUSTED_INFIX}{stamp}-{counter}")
        counter += 1
    os.replace(path, aside)
    record = sha256_record_path(path)
    if with_record and record.exists():
        os.replace(record, sha256_record_path(aside))
    return aside


def _set_aside_untrusted(path: Path, reason: str, source: str, with_record: bool, hint: str = "") -> None:
    aside = _move_aside(path, with_record)
    warnings.warn(
        f"{path} {reason}, so it is not trusted as {source}: moved it aside to {aside.name} (inspect or delete it) "
        f"and downloading it again.{hint}",
        UserWarning,
        stacklevel=2,
    )


@dataclass(frozen=True)
class _ExpectedDigest:
    """The SHA-256 a cached file must have, where it comes from, and what to do when a fresh copy differs."""

    value: str | None
    origin: str
    fix: str


def _expected_digest(target: Path, published: str | None) -> _ExpectedDigest:
    """The published digest when known (it rules), else the one recorded at the first download, else none."""
    if published is not None:
        return _ExpectedDigest(
            published.lower(), "published", "retry; if it fails again, the server is not serving the published file"
        )
    record = sha256_record_path(target)
    return _ExpectedDigest(
        read_recorded_sha256(target),
        f"recorded in {record} at the first download",
        f"if the publisher replaced the file on purpose, delete {record} and load again to trust the new one",
    )


def _cached_copy_is_trusted(target: Path, published: str | None, source: str) -> bool:
    """Whether the cached ``target`` passes its digest check; one that does not is moved aside."""
    expected = _expected_digest(target, published)
    if expected.value is None:
        hint = (
            f" To keep using that copy, move it back and record its digest: run `sha256sum {target.name} > "
            f"{sha256_record_path(target).name}` in {target.parent}"
        )
        garbled = garbled_sha256_record(target)
        reason = (
            f"has a garbled SHA-256 record ({sha256_record_path(target).name} holds {garbled!r}, not a 64-digit hex "
            "SHA-256; moved aside with the file)"
            if garbled is not None
            else "has no recorded SHA-256 (it was put there by hand or by an older version of franca)"
        )
        _set_aside_untrusted(target, reason, source, with_record=garbled is not None, hint=hint)
        return False
    actual = file_sha256(target)
    if actual != expected.value:
        reason = f"has SHA-256 {actual}, not the {expected.value} {expected.origin}"
        _set_aside_untrusted(target, reason, source, with_record=False)
        return False
    return True


def _fetch_verified(target: Path, expected: _ExpectedDigest, source: str, fetch: Callable[[Path], None]) -> None:
    """Have ``fetch`` write a fresh copy, check or record its digest, then move it to ``target``.

    The record is written before the file lands, so a cached file without a record was not written here.
    """
    staging = temporary_path(target)
    try:
        fetch(staging)
        actual = file_sha256(staging)
        if expected.value is not None and actual != expected.value:
            raise RuntimeError(
                f"SHA-256 mismatch for {source}: expected {expected.value} ({expected.origin}), got {actual}; the "
                f"download was deleted; {expected.fix}"
            )
        if expected.value is None:
            warnings.warn(
                f"no SHA-256 is recorded for {source}: trusting this first download and recording its SHA-256 "
                f"{actual} in {sha256_record_path(target)}; later loads are checked against it",
                UserWarning,
                stacklevel=2,
            )
        _record_sha256(target, actual)
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def _ensure_cached(target: Path, published: str | None, source: str, fetch: Callable[[Path], None]) -> bool:
    """Make ``target`` a verified copy of ``source``; True when it was fetched now, False when the cache served it."""
    if target.is_file() and _cached_copy_is_trusted(target, published, source):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    _fetch_verified(target, _expected_digest(target, published), source, fetch)
    return True


def _read_fresh_copy(target: Path, source: str, argument: str) -> dict:
    """Read a file fetched just now; an unreadable one is moved aside and reported with the way out."""
    try:
        return _read_checkpoint(target)
    except RefusedPickleError:
        raise
    except UnreadableCheckpointError as err:
        aside = _move_aside(target, with_record=True)
        raise RuntimeError(
            f"{source} was downloaded to {target}, but it is not a readable checkpoint ({err.detail}); it was moved "
            f"aside to {aside}. The server sent a damaged or incomplete file: load again later to download it anew, "
            f'or download it yourself, check that torch.load reads it, and pass its path as {argument}="/path/to/'
            f'{target.name}"'
        ) from err


def _load_cached(
    target: Path, published: str | None, source: str, fetch: Callable[[Path], None], argument: str
) -> dict:
    """Read the cached copy of ``source``, fetching it when absent or untrusted; a cached copy that cannot be read
    is moved aside and fetched once more."""
    if _ensure_cached(target, published, source, fetch):
        return _read_fresh_copy(target, source, argument)
    try:
        return _read_checkpoint(target)
    except RefusedPickleError:
        raise
    except UnreadableCheckpointError as err:
        _set_aside_untrusted(target, f"cannot be read ({err.detail})", source, with_record=True)
    _ensure_cached(target, published, source, fetch)
    return _read_fresh_copy(target, source, argument)


# ---------------------------------------------------------------------------------------------------------------------
# Downloads


def _download_to(url: str, destination: Path, argument: str) -> None:
    try:
        torch.hub.download_url_to_file(url, str(destination), hash_prefix=None, progress=True)
    except Exception as err:
        name = os.path.basename(urlparse(url).path)
        raise RuntimeError(
            f"could not download {url} ({type(err).__name__}: {err}). Without network access, download the file "
            f'elsewhere and pass its local path instead, e.g. {argument}="/path/to/{name}"'
        ) from err


def _cache_path(url: str, directory: Path) -> Path:
    return directory / os.path.basename(urlparse(url).path)


def download_file(
    url: str, sha256: str | None = None, directory: Path | None = None, argument: str = "weights"
) -> Path:
    """The verified copy of ``url`` in torch.hub's cache (or ``directory``), downloaded when absent or untrusted.

    ``sha256`` is the published digest; without one, the digest recorded at the first download is checked.
    """
    target = _cache_path(url, directory or hub_checkpoint_dir())
    _ensure_cached(target, sha256, url, lambda destination: _download_to(url, destination, argument))
    return target


def _verify_local_sha256(path: Path, sha256: str) -> None:
    actual = file_sha256(path)
    if actual != sha256.lower():
        raise RuntimeError(f"SHA-256 mismatch for {path}: expected {sha256}, got {actual}; check its source")


def load_checkpoint_file(path_or_url: str | os.PathLike, sha256: str | None = None, argument: str = "weights") -> dict:
    """Read a checkpoint (``.pth``, ``.safetensors``, export folder, or URL of one of those) as a dict on CPU.

    A URL goes through the verified cache (module docstring); a local path is read as it is, checked against
    ``sha256`` when given. ``argument`` names the user-facing parameter in error messages (``weights`` or
    ``rasa_weights``).
    """
    if is_url(str(path_or_url)):
        url = str(path_or_url)
        target = _cache_path(url, hub_checkpoint_dir())
        return _load_cached(target, sha256, url, lambda destination: _download_to(url, destination, argument), argument)
    path = Path(path_or_url).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{argument}={str(path_or_url)!r}: no such file or folder; pass a released weights name, an "
            "existing .pth/.safetensors file, a safetensors export folder, a transformers or timm folder, or a URL"
        )
    if sha256 is not None and path.is_file():
        _verify_local_sha256(path, sha256)
    return _read_checkpoint(path)


# ---------------------------------------------------------------------------------------------------------------------
# Split releases


def _extract_single_pth(archive: Path, target: Path) -> None:
    with tarfile.open(archive, "r:*") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".pth")]
        if len(members) != 1:
            names = [m.name for m in tar.getmembers()][:10]
            raise RuntimeError(f"{archive} should hold exactly one .pth file, found members {names}")
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            tar.extract(members[0], path=scratch, filter="data")
            os.replace(Path(scratch) / members[0].name, target)


def _join_parts(parts: list[Path], archive: Path) -> None:
    def concatenate(stream) -> None:
        for part in parts:
            with open(part, "rb") as handle:
                shutil.copyfileobj(handle, stream)

    atomic_write(archive, concatenate)


def _assemble_split_release(urls: list[str], sha256s: list[str | None], archive: Path, destination: Path) -> None:
    """Download the parts beside ``archive``, join them into it and extract its single ``.pth`` to ``destination``;
    the parts and the archive are removed."""
    parts = [download_file(url, sha, archive.parent) for url, sha in zip(urls, sha256s, strict=True)]
    _join_parts(parts, archive)
    _extract_single_pth(archive, destination)
    for downloaded in (archive, *parts):
        downloaded.unlink()
        sha256_record_path(downloaded).unlink(missing_ok=True)


def load_multipart_checkpoint(urls: list[str], checkpoint_file: str, sha256s: list[str | None] | None = None) -> dict:
    """Download the parts of a split ``.tar.gz``, join them, extract its ``.pth`` (cached as ``checkpoint_file``).

    Each part is checked like :func:`download_file`; the extracted file is cached, recorded and checked like a
    single download.
    """
    directory = hub_checkpoint_dir()
    sha256s = sha256s or [None] * len(urls)
    archive = directory / "parts" / f"{Path(checkpoint_file).stem}.tar.gz"
    source = f"the file extracted from {', '.join(urls)}"

    def assemble(destination: Path) -> None:
        _assemble_split_release(urls, sha256s, archive, destination)

    return _load_cached(directory / checkpoint_file, None, source, assemble, "weights")
