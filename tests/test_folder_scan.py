"""Safe folder scans and reads (dataset_prep.md, "Folder scans"): symlink loops end, each real directory is listed
once, only regular files are opened, skips are reported in one line, and the decode-size cap skips giant images from
their header."""

import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from franca.data.datasets import ImageFolder, UnreadableImageWarning, base
from franca.data.datasets.files import open_regular_file
from franca.data.datasets.folder_scan import FolderScanWarning, scan_image_files
from franca.data.image_decoding import ImageDecoding, ImageTooLargeError


def photo(path: Path, value: int = 0, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)
    return path


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header announces ``width`` x ``height`` grey pixels (the pixel data is a token: the cap must
    refuse it from the header alone)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width + 1))  # one row of the declared width
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_one_symlink_loop_lists_every_image_once_and_says_so(tmp_path):
    root = tmp_path / "photos"
    photo(root / "cats" / "a.png")
    photo(root / "dogs" / "b.png")
    os.symlink("..", root / "cats" / "loop")  # cats/loop/cats/loop/... without the policy
    with pytest.warns(FolderScanWarning, match=r"listed 2 image\(s\), skipped 1 entries: 1 link\(s\) to a directory"):
        assert scan_image_files(root) == ["cats/a.png", "dogs/b.png"]


def test_two_interlocked_loops_end_and_list_each_real_directory_once(tmp_path):
    root = tmp_path / "photos"
    photo(root / "a" / "1.png")
    photo(root / "b" / "2.png")
    os.symlink(root, root / "a" / "to_root")
    os.symlink(root / "a", root / "b" / "to_a")
    with pytest.warns(FolderScanWarning, match="skipped 2 entries: 2 link"):
        assert scan_image_files(root) == ["a/1.png", "b/2.png"]


def test_a_linked_folder_outside_the_root_is_listed_once_at_its_first_link(tmp_path):
    outside = tmp_path / "elsewhere" / "birds"
    photo(outside / "c.png")
    root = tmp_path / "photos"
    photo(root / "cats" / "a.png")
    os.symlink(outside, root / "birds")
    os.symlink(outside, root / "zz_birds_again")
    with pytest.warns(FolderScanWarning, match="skipped 1 entries"):
        dataset = ImageFolder(str(root))
    assert list(dataset._paths) == ["birds/c.png", "cats/a.png"] and dataset.classes == ["birds", "cats"]


def test_a_fifo_named_like_an_image_is_skipped_by_the_scan_never_opened(tmp_path):
    root = tmp_path / "photos"
    photo(root / "a.png")
    os.mkfifo(root / "x.jpg")
    os.symlink(root / "missing.png", root / "broken.png")
    with pytest.warns(FolderScanWarning, match=r"skipped 2 entries: 1 broken link\(s\), 1 not a regular file"):
        assert scan_image_files(root) == ["a.png"]


def test_opening_a_fifo_is_refused_at_once_instead_of_blocking(tmp_path):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    outcome = []

    def attempt():
        try:
            open_regular_file(fifo).close()
            outcome.append("opened")
        except OSError as err:
            outcome.append(str(err))

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), "opening a named pipe blocked"
    assert outcome == [f"{fifo} is a named pipe, not a regular file; only regular files are read"]


@pytest.fixture
def lenient(monkeypatch):
    """Two-image folders: one failed read is half of them, so the 1% budget is lifted for these tests."""
    monkeypatch.setattr(base, "MAX_FAILURE_FRACTION", 0.5)


def test_an_image_swapped_for_a_fifo_after_the_scan_is_skipped_like_an_unreadable_one(tmp_path, lenient):
    root = tmp_path / "photos"
    photo(root / "a.png", 10)
    photo(root / "b.png", 20)
    dataset = ImageFolder(str(root))
    (root / "a.png").unlink()
    os.mkfifo(root / "a.png")
    with pytest.warns(UnreadableImageWarning, match="a.png .*named pipe"):
        image, _ = dataset[0]
    assert np.asarray(image)[0, 0, 0] == 20


def test_a_144_megapixel_png_is_skipped_by_the_decode_cap_from_its_header(tmp_path, lenient):
    root = tmp_path / "photos"
    png_header(root / "a_giant.png", 12000, 12000)
    photo(root / "b.png", 30)
    dataset = ImageFolder(str(root))
    with pytest.warns(
        UnreadableImageWarning, match=r"a_giant.png .*12000x12000 = 144 megapixels.*image_max_megapixels"
    ):
        image, _ = dataset[0]
    assert np.asarray(image)[0, 0, 0] == 30


def test_the_decode_cap_is_configurable(tmp_path):
    path = photo(tmp_path / "p.png", size=100)
    with open(path, "rb") as stream, pytest.raises(ImageTooLargeError, match=r"100x100 = 0 megapixels.*cap of 0.005"):
        ImageDecoding.from_options(image_max_megapixels=0.005).open(stream)
    with open(path, "rb") as stream, ImageDecoding.from_options(image_max_megapixels=0.02).open(stream) as image:
        assert image.size == (100, 100)


def test_a_root_and_names_with_bytes_that_are_not_utf8_work(tmp_path):
    root = os.path.join(os.fsencode(tmp_path), b"ph\xffotos")
    photo(Path(os.fsdecode(os.path.join(root, b"cl\xe9", b"\xfc.png"))), 40)
    dataset = ImageFolder(os.fsdecode(root))
    image, target = dataset[0]
    assert np.asarray(image)[0, 0, 0] == 40 and target == 0 and dataset.classes == [os.fsdecode(b"cl\xe9")]
