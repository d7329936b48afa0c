"""Safe reading of checkpoint files, folders and URLs (design: "Safe loading").

- ``.pth`` files are read with ``torch.load(weights_only=True)``: a pickle that would run code is refused.
- URLs are downloaded into torch.hub's cache (``$TORCH_HOME/hub/checkpoints``) and checked against a SHA-256 when
  one is known; a mismatching file is deleted and refused.
- The ViT-g release is split into ``.tar.gz`` parts (reference §2.7): they are joined and the ``.pth`` inside is
  extracted with ``tarfile``'s ``"data"`` filter (no links, devices or paths outside the target folder).
- A safetensors export is either a bare ``.safetensors`` file or a folder with ``model.safetensors`` and
  ``config.json`` (``{"arch": <name in ARCHITECTURES or null>, <DinoVisionTransformer keyword>: value, ...}``).
"""

import hashlib
import json
import os
import pickle
import shutil
import tarfile
import tempfile
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch

EXPORT_WEIGHTS_FILE = "model.safetensors"
EXPORT_CONFIG_FILE = "config.json"


def is_url(value: str) -> bool:
    return urlparse(str(value)).scheme in ("http", "https")


def hub_checkpoint_dir() -> Path:
    """torch.hub's checkpoint cache (follows ``$TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _warn_unverified(path: Path, origin: str) -> None:
    warnings.warn(f"no SHA-256 is recorded for {origin}: {path} was not verified", UserWarning, stacklevel=3)


def _verify_sha256(path: Path, sha256: str | None, origin: str, delete_on_mismatch: bool) -> None:
    """Refuse a file whose digest differs from a known one (deleting a download); warn when none is known."""
    if sha256 is None:
        _warn_unverified(path, origin)
        return
    actual = file_sha256(path)
    if actual != sha256.lower():
        if delete_on_mismatch:
            path.unlink(missing_ok=True)
        action = "the downloaded file was deleted; retry the download" if delete_on_mismatch else "check its source"
        raise RuntimeError(f"SHA-256 mismatch for {origin}: expected {sha256}, got {actual}; {action}")


def download_file(
    url: str, sha256: str | None = None, directory: Path | None = None, argument: str = "weights"
) -> Path:
    """Download ``url`` into torch.hub's cache (reusing a cached copy that passes the check) and verify it."""
    directory = directory or hub_checkpoint_dir()
    target = directory / os.path.basename(urlparse(url).path)
    if target.is_file() and (sha256 is None or file_sha256(target) == sha256.lower()):
        if sha256 is None:
            _warn_unverified(target, url)
        return target
    directory.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), hash_prefix=None, progress=True)
    except Exception as err:
        raise RuntimeError(
            f"could not download {url} ({type(err).__name__}: {err}). Without network access, download the file "
            f'elsewhere and pass its local path instead, e.g. {argument}="/path/to/{target.name}"'
        ) from err
    _verify_sha256(target, sha256, url, delete_on_mismatch=True)
    return target


def _torch_load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err).strip().splitlines()[0]
        raise RuntimeError(
            f"refusing to load {path}: it is not a plain tensor checkpoint, and unpickling it could run arbitrary "
            f"code ({detail}). If you trust its source, load it yourself with torch.load(weights_only=False) and "
            "save its state dict with torch.save(state_dict, path)"
        ) from err


def _load_safetensors(path: Path) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise ImportError(
            f"reading {path} needs the 'safetensors' package: pip install safetensors (or franca[export])"
        ) from err
    return load_file(str(path), device="cpu")


def read_export_config(folder: str | os.PathLike) -> dict:
    """The ``config.json`` of a safetensors export folder (ViT constructor keywords and ``arch``)."""
    path = Path(folder) / EXPORT_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is a folder but has no {EXPORT_CONFIG_FILE} (a safetensors export needs one)"
        )
    with open(path) as handle:
        config = json.load(handle)
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object of ViT keywords, got {type(config).__name__}")
    return config


def load_checkpoint_file(path_or_url: str | os.PathLike, sha256: str | None = None, argument: str = "weights") -> dict:
    """Read a checkpoint (``.pth``, ``.safetensors``, export folder, or URL of one of those) as a dict on CPU.

    ``argument`` names the user-facing parameter in error messages (``weights`` or ``rasa_weights``).
    """
    if is_url(str(path_or_url)):
        path = download_file(str(path_or_url), sha256, argument=argument)
    else:
        path = Path(path_or_url).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"{argument}={str(path_or_url)!r}: no such file or folder; pass a released weights name, an "
                "existing .pth/.safetensors file, a safetensors export folder, or a URL"
            )
        if sha256 is not None and path.is_file():
            _verify_sha256(path, sha256, str(path), delete_on_mismatch=False)
    if path.is_dir():
        weights = path / EXPORT_WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{path} is a folder without {EXPORT_WEIGHTS_FILE} (not a safetensors export)")
        read_export_config(path)
        return _load_safetensors(weights)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    return _torch_load(path)


def _extract_single_pth(archive: Path, target: Path) -> None:
    with tarfile.open(archive, "r:*") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".pth")]
        if len(members) != 1:
            names = [m.name for m in tar.getmembers()][:10]
            raise RuntimeError(f"{archive} should hold exactly one .pth file, found members {names}")
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            tar.extract(members[0], path=scratch, filter="data")
            os.replace(Path(scratch) / members[0].name, target)


def load_multipart_checkpoint(urls: list[str], checkpoint_file: str, sha256s: list[str | None] | None = None) -> dict:
    """Download the parts of a split ``.tar.gz``, join them, extract its ``.pth`` (cached as ``checkpoint_file``)."""
    directory = hub_checkpoint_dir()
    target = directory / checkpoint_file
    if not target.is_file():
        sha256s = sha256s or [None] * len(urls)
        parts = [download_file(url, sha, directory / "parts") for url, sha in zip(urls, sha256s, strict=True)]
        archive = directory / "parts" / f"{Path(checkpoint_file).stem}.tar.gz"
        with open(archive, "wb") as joined:
            for part in parts:
                with open(part, "rb") as handle:
                    shutil.copyfileobj(handle, joined)
        _extract_single_pth(archive, target)
        for downloaded in (archive, *parts):
            downloaded.unlink()
    return _torch_load(target)
