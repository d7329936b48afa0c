"""The torch.hub cache is trusted on first use: digests recorded at download, checked at every later load."""

import hashlib
import io
import tarfile
import urllib.error
import warnings
from pathlib import Path

import pytest
import torch

from franca.hub import load_checkpoint_file, load_multipart_checkpoint

URL = "https://example.org/weights/small.pth"


@pytest.fixture
def server(tmp_path, monkeypatch):
    """An empty cache under ``TORCH_HOME`` and a fake download serving ``files`` (URL → bytes), logging requests."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    files: dict[str, bytes] = {}
    requested: list[str] = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        requested.append(url)
        if url not in files:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        Path(dst).write_bytes(files[url])

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    return files, requested, tmp_path / "torch_home" / "hub" / "checkpoints"


def checkpoint_bytes(value: float) -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.full((64,), value)}, buffer)
    return buffer.getvalue()


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def loaded_value(source) -> float:
    return float(load_checkpoint_file(source)["w"][0])


def set_aside(cache: Path, name: str) -> list[Path]:
    return sorted(cache.glob(f"{name}.untrusted-*"))


def load_quietly(source) -> float:
    """Load and fail on any warning: a trusted cached file is read silently."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return loaded_value(source)


def test_first_download_records_its_digest_and_later_loads_check_it(server):
    files, requested, cache = server
    files[URL] = checkpoint_bytes(1.0)
    with pytest.warns(UserWarning, match=r"no SHA-256 is recorded for .*small.pth: trusting this first download"):
        assert loaded_value(URL) == 1.0
    record = (cache / "small.pth.sha256").read_text().split()
    assert record == [sha256_of(files[URL]), "small.pth"]

    assert load_quietly(URL) == 1.0
    assert requested == [URL], "a verified cached file is not downloaded again"
    assert not set_aside(cache, "small.pth") and sorted(p.name for p in cache.iterdir()) == [
        "small.pth",
        "small.pth.sha256",
    ]


@pytest.mark.parametrize(
    "record", [None, "d41d8cd98f00b204e9800998ecf8427e  small.pth\n"], ids=["no_record", "garbled_record_an_md5"]
)
def test_planted_file_without_a_valid_record_is_moved_aside_and_downloaded(server, record):
    files, requested, cache = server
    files[URL] = checkpoint_bytes(1.0)
    cache.mkdir(parents=True)
    planted = checkpoint_bytes(666.0)
    (cache / "small.pth").write_bytes(planted)
    if record is not None:
        (cache / "small.pth.sha256").write_text(record)

    with pytest.warns(UserWarning) as caught:
        assert loaded_value(URL) == 1.0
    messages = " ".join(str(w.message) for w in caught)
    if record is None:
        assert "small.pth has no recorded SHA-256" in messages
    else:
        assert "small.pth has a garbled SHA-256 record (small.pth.sha256 holds 'd41d8cd98f00b204" in messages
        assert "no recorded SHA-256" not in messages
    assert "sha256sum small.pth > small.pth.sha256" in messages
    assert requested == [URL]
    (aside,) = [path for path in set_aside(cache, "small.pth") if path.suffix != ".sha256"]
    assert aside.read_bytes() == planted, "the planted file is kept, not deleted"
    if record is not None:
        assert (cache / f"{aside.name}.sha256").read_text() == record, "the garbled record is kept beside it"
    assert (cache / "small.pth.sha256").read_text().split()[0] == sha256_of(files[URL])


def test_a_copy_recorded_by_hand_in_sha256sum_format_is_trusted(server):
    files, requested, cache = server
    files[URL] = checkpoint_bytes(1.0)
    cache.mkdir(parents=True)
    own_copy = checkpoint_bytes(2.0)
    (cache / "small.pth").write_bytes(own_copy)
    (cache / "small.pth.sha256").write_text(f"{sha256_of(own_copy)}  small.pth\n")
    assert load_quietly(URL) == 2.0
    assert requested == []


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("echo this must never run",))


@pytest.mark.parametrize("protocol", [0, 2])
def test_a_legacy_format_malicious_pickle_is_refused_as_unsafe_not_called_damaged(tmp_path, protocol, capfd):
    """torch's legacy (non-zip) format; with protocol 0 the refusal is an opcode, not a named global."""
    path = tmp_path / "legacy.pth"
    torch.save(
        {"w": torch.ones(2), "x": _RunsCode()}, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol
    )
    with pytest.raises(
        RuntimeError, match=r"refusing to load .*legacy\.pth: it is a pickle that the weights-only reader"
    ) as info:
        load_checkpoint_file(path)
    assert "damaged" not in str(info.value) and "could run arbitrary code" in str(info.value)
    assert "this must never run" not in capfd.readouterr().out


def test_random_bytes_are_damage_not_a_refusal(tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(bytes(range(210, 256)) * 20)
    with pytest.raises(RuntimeError, match="is not a readable checkpoint: .*damaged or incomplete"):
        load_checkpoint_file(path)


def test_tampered_file_is_moved_aside_and_downloaded_again(server):
    files, requested, cache = server
    files[URL] = checkpoint_bytes(1.0)
    with pytest.warns(UserWarning, match="trusting this first download"):
        loaded_value(URL)
    tampered = checkpoint_bytes(666.0)
    (cache / "small.pth").write_bytes(tampered)

    with pytest.warns(UserWarning, match=rf"small.pth has SHA-256 {sha256_of(tampered)}, not the .* recorded in"):
        assert loaded_value(URL) == 1.0
    assert requested == [URL, URL]
    (aside,) = set_aside(cache, "small.pth")
    assert aside.read_bytes() == tampered
    assert load_quietly(URL) == 1.0


def test_download_that_differs_from_the_recorded_digest_is_refused(server):
    """Trust on first use: once recorded, a different file at the same URL is not accepted silently."""
    files, _, cache = server
    files[URL] = checkpoint_bytes(1.0)
    with pytest.warns(UserWarning, match="trusting this first download"):
        loaded_value(URL)
    (cache / "small.pth").write_bytes(b"damaged")
    files[URL] = checkpoint_bytes(3.0)

    with pytest.warns(UserWarning, match="not the .* recorded"), pytest.raises(RuntimeError) as info:
        loaded_value(URL)
    message = str(info.value)
    assert f"SHA-256 mismatch for {URL}: expected {sha256_of(checkpoint_bytes(1.0))}" in message
    assert f"delete {cache / 'small.pth.sha256'}" in message
    assert not (cache / "small.pth").exists() and not list(cache.glob(".small.pth.tmp.*"))


def test_published_digest_rules_over_a_record(server):
    files, requested, cache = server
    files[URL] = checkpoint_bytes(1.0)
    cache.mkdir(parents=True)
    forged = checkpoint_bytes(666.0)
    (cache / "small.pth").write_bytes(forged)
    (cache / "small.pth.sha256").write_text(f"{sha256_of(forged)}  small.pth\n")

    with pytest.warns(UserWarning, match=r"not the \w+ published"):
        state = load_checkpoint_file(URL, sha256=sha256_of(files[URL]).upper())
    assert float(state["w"][0]) == 1.0 and requested == [URL]
    assert set_aside(cache, "small.pth")[0].read_bytes() == forged


def plant_recorded(cache: Path, name: str, content: bytes) -> None:
    """A cached file with a matching record, as a download that the server cut short leaves it."""
    cache.mkdir(parents=True, exist_ok=True)
    (cache / name).write_bytes(content)
    (cache / f"{name}.sha256").write_text(f"{sha256_of(content)}  {name}\n")


def moved_files(cache: Path, name: str) -> list[Path]:
    return [p for p in set_aside(cache, name) if p.suffix != ".sha256"]


def test_truncated_cached_file_is_moved_aside_and_downloaded_again(server):
    files, requested, cache = server
    whole = checkpoint_bytes(1.0)
    truncated = whole[: len(whole) // 2]
    plant_recorded(cache, "small.pth", truncated)
    files[URL] = whole

    with pytest.warns(UserWarning) as caught:
        assert loaded_value(URL) == 1.0
    assert any(f"{cache / 'small.pth'} cannot be read (RuntimeError: " in str(w.message) for w in caught)
    assert requested == [URL]
    (aside,) = moved_files(cache, "small.pth")
    assert aside.read_bytes() == truncated
    assert Path(f"{aside}.sha256").read_text().split()[0] == sha256_of(truncated), "its record moves with it"
    assert (cache / "small.pth.sha256").read_text().split()[0] == sha256_of(whole)
    assert load_quietly(URL) == 1.0


def test_unreadable_download_twice_names_the_url_the_file_and_the_fix(server):
    files, requested, cache = server
    truncated = checkpoint_bytes(1.0)[:1500]
    plant_recorded(cache, "small.pth", truncated)
    files[URL] = truncated

    with pytest.warns(UserWarning) as caught, pytest.raises(RuntimeError) as info:
        loaded_value(URL)
    assert any("small.pth cannot be read" in str(w.message) for w in caught)
    message = str(info.value)
    assert f"{URL} was downloaded to {cache / 'small.pth'}, but it is not a readable checkpoint" in message
    assert 'pass its path as weights="/path/to/small.pth"' in message
    assert requested == [URL], "downloaded again once, not in a loop"
    assert len(moved_files(cache, "small.pth")) == 2
    assert not (cache / "small.pth").exists() and not (cache / "small.pth.sha256").exists()


def safetensors_bytes() -> bytes:
    from safetensors.torch import save

    return save({"w": torch.ones(64)})


@pytest.mark.parametrize(
    "name, content, what",
    [
        ("half.pth", checkpoint_bytes(1.0)[:1500], "failed reading zip archive"),
        ("empty.pth", b"", "EOFError"),
        ("page.pth", b"<html>404 Not Found</html>", "UnpicklingError"),
        ("half.safetensors", safetensors_bytes()[:100], "SafetensorError"),
    ],
)
def test_unreadable_local_file_is_named_with_what_is_wrong(tmp_path, name, content, what):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(RuntimeError) as info:
        load_checkpoint_file(path)
    message = str(info.value)
    assert f"{path} ({len(content)} bytes) is not a readable checkpoint" in message
    assert what in message and "damaged or incomplete" in message
    assert path.read_bytes() == content, "a user's own file is left as it is"


def split_release(payload: bytes, urls: list[str]) -> list[bytes]:
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        info = tarfile.TarInfo("release/split.pth")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    data = archive.getvalue()
    cut = len(data) // len(urls)
    return [data[i * cut : (i + 1) * cut if i < len(urls) - 1 else None] for i in range(len(urls))]


def test_split_release_extracted_file_is_recorded_and_checked(server):
    files, requested, cache = server
    urls = [f"https://example.org/split_chunked.tar.gz.part_{s}" for s in ("aa", "ab")]
    payload = checkpoint_bytes(5.0)
    files.update(zip(urls, split_release(payload, urls), strict=True))

    with pytest.warns(UserWarning, match="no SHA-256 is recorded"):
        assert float(load_multipart_checkpoint(urls, "split.pth")["w"][0]) == 5.0
    assert (cache / "split.pth.sha256").read_text().split() == [sha256_of(payload), "split.pth"]
    assert list((cache / "parts").iterdir()) == [], "parts, their records and the joined archive are removed"

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_multipart_checkpoint(urls, "split.pth")
    assert requested == urls

    (cache / "split.pth").write_bytes(checkpoint_bytes(666.0))
    with pytest.warns(UserWarning) as caught:
        assert float(load_multipart_checkpoint(urls, "split.pth")["w"][0]) == 5.0
    assert any("split.pth has SHA-256" in str(w.message) and "extracted from" in str(w.message) for w in caught)
    assert requested == urls + urls
    assert len(set_aside(cache, "split.pth")) == 1
