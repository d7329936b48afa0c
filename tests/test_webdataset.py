"""WebDataset shards: patterns, grouping, the rank/worker split, deterministic and resumable training streams, and
the unreadable-image policy, on tiny tar shards of real photos (scikit-image) written here."""

import io
import itertools
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from franca.data.augmentations import DataAugmentationDINO
from franca.data.collate import MaskingCollator
from franca.data.datasets import TooManyUnreadableImagesError, UnreadableImageWarning
from franca.data.datasets.webdataset import (
    SAMPLES_PER_SHARD_LIMIT,
    WebDatasetShards,
    count_shard_samples,
    expand_braces,
    resolve_shards,
    write_sample_counts,
)
from franca.data.loaders import make_dataset
from franca.data.masking import build_mask_generator
from franca.data.streams import WebDatasetTrainStream, make_webdataset_train_loader

skimage_data = pytest.importorskip("skimage.data")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")
SAMPLES_PER_SHARD = (5, 4, 6, 3, 5)
CORRUPT = (1, 2)  # (shard, sample) holding a truncated JPEG


def _photo_variant(number: int) -> Image.Image:
    photo = getattr(skimage_data, PHOTOS[number % len(PHOTOS)])()
    image = Image.fromarray(photo).convert("RGB")
    offset = 7 * number
    return image.crop((offset, offset, offset + 160, offset + 160)).resize((24, 24))


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_shards(folder: Path) -> dict[tuple[int, int], tuple[bytes | None, int]]:
    """Shards 00000..00004.tar; returns {(shard, sample): (image bytes or None if corrupt, target)}."""
    expected, number = {}, 0
    for shard, size in enumerate(SAMPLES_PER_SHARD):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            _add(tar, f"nothing{shard}.txt", b"a group without image is not a sample")
            for sample in range(size):
                key, fmt = f"{shard:02d}{sample:04d}", ("JPEG", "PNG")[number % 2]
                data = _encode(_photo_variant(number), fmt)
                if (shard, sample) == CORRUPT:
                    data = data[: len(data) // 3]
                _add(tar, f"{key}.{fmt.lower().replace('jpeg', 'jpg')}", data)
                _add(tar, f"{key}.json", json.dumps({"caption": "x"}).encode())
                _add(tar, f"{key}.txt", b"a caption")
                target = number % 3 if shard == 4 else -1
                if shard == 4:
                    _add(tar, f"{key}.cls", str(target).encode())
                expected[(shard, sample)] = (None if (shard, sample) == CORRUPT else data, target)
                number += 1
    return expected


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("shards")
    return folder, _write_shards(folder)


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy())


def test_brace_expansion_and_the_three_pattern_kinds(shards, tmp_path):
    assert expand_braces("a{08..10}b{x,y}") == ["a08bx", "a08by", "a09bx", "a09by", "a10bx", "a10by"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="descending"):
        expand_braces("{5..3}.tar")
    folder, _ = shards
    expected = [folder / f"{i:05d}.tar" for i in range(5)]
    assert resolve_shards(f"{folder}/{{00000..00004}}.tar") == expected
    assert resolve_shards(f"{folder}/*.tar") == expected
    listing = folder / "shards.txt"
    listing.write_text("# my shards\n" + "".join(f"{p.name}\n" for p in expected))
    assert resolve_shards(str(listing)) == expected
    with pytest.raises(FileNotFoundError, match=r"2 of 7 shard files do not exist \(.*00005.tar"):
        resolve_shards(f"{folder}/{{00000..00006}}.tar")
    with pytest.raises(ValueError, match="local shard files only"):
        resolve_shards("https://example.org/{000..009}.tar")


def test_one_pass_groups_members_reads_labels_and_skips_the_corrupt_image(shards):
    folder, expected = shards
    dataset = make_dataset(f"WebDataset:urls={folder}/{{00000..00004}}.tar")
    assert isinstance(dataset, WebDatasetShards)
    with pytest.warns(UnreadableImageWarning, match=r"010002\.png in shard .*00001\.tar"):
        got = list(dataset)
    readable = [value for key, value in sorted(expected.items()) if value[0] is not None]
    assert len(got) == len(readable) == sum(SAMPLES_PER_SHARD) - 1
    for (image, target), (data, expected_target) in zip(got, readable):
        assert np.array_equal(np.asarray(image), _pixels(data))
        assert target == expected_target
    assert dataset.read_failures.failed == 1 and dataset.read_failures.attempted == sum(SAMPLES_PER_SHARD)


def test_streams_cover_every_sample_exactly_once_per_pass(shards):
    folder, expected = shards
    dataset = WebDatasetShards(f"{folder}/*.tar")
    num_streams = 4  # 2 ranks x 2 workers
    for pass_index in range(3):
        owned = [dataset.stream_shards(7, pass_index, s, num_streams) for s in range(num_streams)]
        assert sorted(itertools.chain(*owned)) == list(range(5))
    seen = []
    for stream in range(num_streams):
        for sample, pass_index in dataset.stream_samples(7, stream, num_streams):
            if pass_index > 0:
                break
            seen.append((sample.shard_id, sample.index))
    assert sorted(seen) == sorted(expected)


def _train_loader(urls: str, start: int, num_workers: int, seed: int = 5, counts: str | None = None):
    transform = DataAugmentationDINO((0.5, 1.0), (0.2, 0.5), 2, global_crops_size=16, local_crops_size=8)
    collate = MaskingCollator(mask_generator=build_mask_generator((4, 4)), n_tokens=16, seed=seed)
    dataset = make_dataset(f"WebDataset:urls={urls}" + (f":counts={counts}" if counts else ""))
    return make_webdataset_train_loader(
        dataset, transform, collate, batch_size_per_rank=3, seed=seed, start_iteration=start, num_workers=num_workers
    )


def _take(loader, n: int) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        return list(itertools.islice(iter(loader), n))


@pytest.mark.slow
def test_resumed_loader_equals_the_uninterrupted_stream(shards, tmp_path):
    folder, _ = shards
    urls = f"{folder}/*.tar"
    full = _take(_train_loader(urls, start=0, num_workers=2), 14)
    assert [batch["iteration"] for batch in full] == list(range(14))
    counts = write_sample_counts(urls, tmp_path / "counts.json")
    assert json.loads(counts.read_text()) == {f"{i:05d}.tar": n for i, n in enumerate(SAMPLES_PER_SHARD)}
    for resumed in (_take(_train_loader(urls, 9, 2), 5), _take(_train_loader(urls, 9, 2, counts=str(counts)), 5)):
        for got, want in zip(resumed, full[9:]):
            assert got["iteration"] == want["iteration"]
            assert torch.equal(got["sample_indices"], want["sample_indices"])
            assert torch.equal(got["collated_global_crops"], want["collated_global_crops"])
            assert torch.equal(got["collated_masks"], want["collated_masks"])
    again = _take(_train_loader(urls, start=0, num_workers=2), 14)
    assert all(torch.equal(a["collated_local_crops"], b["collated_local_crops"]) for a, b in zip(again, full))
    other_seed = _take(_train_loader(urls, start=0, num_workers=2, seed=6), 14)
    assert any(not torch.equal(a["sample_indices"], b["sample_indices"]) for a, b in zip(other_seed, full))


def test_loader_batches_follow_the_documented_stream_layout(shards):
    """Iteration i of a rank with W workers is batch i // W of stream i mod W (positions [i // W · B, ...))."""
    folder, _ = shards
    urls = f"{folder}/*.tar"
    dataset = WebDatasetShards(urls)

    def expected_ids(iteration: int, workers: int = 2, batch: int = 3) -> list[int]:
        stream = dataset.stream_samples(5, iteration % workers, workers)
        start = (iteration // workers) * batch
        return [
            s.shard_id * SAMPLES_PER_SHARD_LIMIT + s.index for s, _ in itertools.islice(stream, start, start + batch)
        ]

    for start in (0, 5):
        batches = _take(_train_loader(urls, start=start, num_workers=2), 6)
        assert [batch["iteration"] for batch in batches] == list(range(start, start + 6))
        for batch in batches:
            assert batch["sample_indices"].tolist() == expected_ids(batch["iteration"])
    with pytest.raises(ValueError, match="5 shards for 6 streams"):
        _train_loader(urls, start=0, num_workers=6)


def test_corrupt_image_position_gets_the_next_readable_image(shards):
    folder, expected = shards
    dataset = WebDatasetShards(f"{folder}/*.tar")
    stream = WebDatasetTrainStream(dataset, _to_tensor, seed=1, batch_size_per_rank=4)
    with pytest.warns(UnreadableImageWarning):
        samples = list(itertools.islice(iter(stream), sum(SAMPLES_PER_SHARD)))
    corrupt_id = CORRUPT[0] * SAMPLES_PER_SHARD_LIMIT + CORRUPT[1]
    ids = [key.index for _, _, key in samples]
    assert sorted(ids) == sorted(s * SAMPLES_PER_SHARD_LIMIT + i for s, i in expected)
    position = ids.index(corrupt_id)
    assert torch.equal(samples[position][0], samples[position + 1][0])
    next_shard, next_index = divmod(ids[position + 1], SAMPLES_PER_SHARD_LIMIT)
    assert np.array_equal(samples[position][0].numpy(), _pixels(expected[(next_shard, next_index)][0]))
    assert [key.iteration for _, _, key in samples] == [n // 4 for n in range(len(samples))]
    assert dataset.read_failures.failed == 1


def test_more_than_one_percent_unreadable_stops_with_the_pattern(tmp_path):
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        good = _encode(_photo_variant(0).resize((4, 4)), "PNG")
        for number in range(120):
            _add(tar, f"{number:04d}.png", b"not an image" if number in (10, 50) else good)
    dataset = WebDatasetShards(str(tmp_path / "bad.tar"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        with pytest.raises(TooManyUnreadableImagesError, match=r"2 of 100 image reads failed .*bad\.tar"):
            list(dataset)


TRUNCATED_SHARD_SAMPLES = 6


def _labelled_pixels(number: int) -> np.ndarray:
    return np.full((4, 4, 3), (number * 40 % 256, number * 7, 255 - number), dtype=np.uint8)


def _write_labelled_shard(path: Path, first: int, count: int) -> list[tuple[np.ndarray, int]]:
    """A shard of ``count`` samples (a 4x4 PNG of one colour and a .cls label each); returns (pixels, label)."""
    numbers = range(first, first + count)
    with tarfile.open(path, "w") as tar:
        for number in numbers:
            _add(tar, f"{number:06d}.png", _encode(Image.fromarray(_labelled_pixels(number)), "PNG"))
            _add(tar, f"{number:06d}.cls", str(number).encode())
    return [(_labelled_pixels(number), number) for number in numbers]


def _whole_samples_before(layout: list[tarfile.TarInfo], cut: int) -> int:
    """How many samples of an intact two-member-per-sample shard lie wholly before byte ``cut``: sample k counts when
    the next sample's first header is complete, the last one when its data is followed by at least one byte of the
    end-of-archive marker (without it, members of the last sample could be missing)."""
    first_headers = [member.offset for member in layout[::2]]
    end_of_members = layout[-1].offset_data + -(-layout[-1].size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    complete = [header + tarfile.BLOCKSIZE for header in first_headers[1:]] + [end_of_members + 1]
    return sum(1 for needed in complete if cut >= needed)


def _cut_points(layout: list[tarfile.TarInfo], size: int) -> dict[str, int]:
    second_sample, last = layout[2], layout[-1]
    return {
        "empty file": 0,
        "inside the first header": 100,
        "inside the first image": layout[0].offset_data + 10,
        "at the second sample's header": second_sample.offset,
        "inside the second sample's header": second_sample.offset + 200,
        "just after the second sample's header": second_sample.offset + tarfile.BLOCKSIZE,
        "inside the last label": last.offset_data + 1,
        "at the end-of-archive marker": last.offset_data + tarfile.BLOCKSIZE,
        "one byte into the marker": last.offset_data + tarfile.BLOCKSIZE + 1,
        "one byte short of the end": size - 1,
    }


@pytest.fixture(scope="module")
def truncated_shard_layout(tmp_path_factory) -> tuple[Path, list[tarfile.TarInfo]]:
    path = tmp_path_factory.mktemp("layout") / "intact.tar"
    _write_labelled_shard(path, 0, TRUNCATED_SHARD_SAMPLES)
    with tarfile.open(path) as tar:
        return path, tar.getmembers()


@pytest.mark.parametrize(
    "where",
    [
        "empty file",
        "inside the first header",
        "inside the first image",
        "at the second sample's header",
        "inside the second sample's header",
        "just after the second sample's header",
        "inside the last label",
        "at the end-of-archive marker",
        "one byte into the marker",
        "one byte short of the end",
    ],
)
def test_truncated_shard_is_warned_by_name_counted_and_the_rest_still_read(tmp_path, truncated_shard_layout, where):
    """A cut that leaves part of the end-of-archive marker loses nothing: no warning, every sample read."""
    intact, layout = truncated_shard_layout
    cut = _cut_points(layout, intact.stat().st_size)[where]
    before = _write_labelled_shard(tmp_path / "00000.tar", 100, 3)
    (tmp_path / "00001.tar").write_bytes(intact.read_bytes()[:cut])
    after = _write_labelled_shard(tmp_path / "00002.tar", 200, 4)
    kept = _whole_samples_before(layout, cut)
    damaged = kept < TRUNCATED_SHARD_SAMPLES
    expected = before + [(_labelled_pixels(number), number) for number in range(kept)] + after

    dataset = make_dataset(f"WebDataset:urls={tmp_path}/{{00000..00002}}.tar")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = list(dataset)
    messages = [str(w.message) for w in caught if issubclass(w.category, UnreadableImageWarning)]
    assert len(messages) == damaged
    if damaged:
        assert f"{tmp_path / '00001.tar'} is truncated or damaged after its first {kept} samples" in messages[0]
    assert dataset.read_failures.failed == damaged
    assert dataset.read_failures.attempted == len(expected) + damaged
    assert [target for _, target in got] == [label for _, label in expected]
    assert all(np.array_equal(np.asarray(image), pixels) for (image, _), (pixels, _) in zip(got, expected))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert count_shard_samples(tmp_path / "00001.tar") == kept
    assert [("00001.tar is truncated" in str(w.message)) for w in caught] == [True] * damaged


def test_intact_shards_raise_no_truncation_warning(truncated_shard_layout):
    intact, _ = truncated_shard_layout
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert count_shard_samples(intact) == TRUNCATED_SHARD_SAMPLES
        assert len(list(WebDatasetShards(str(intact)))) == TRUNCATED_SHARD_SAMPLES


def test_resume_across_a_truncated_shard_equals_the_uninterrupted_stream(tmp_path, truncated_shard_layout):
    intact, layout = truncated_shard_layout
    for shard, first in enumerate((0, 10, 20, 30)):
        _write_labelled_shard(tmp_path / f"{shard:05d}.tar", first, 5)
    (tmp_path / "00002.tar").write_bytes(intact.read_bytes()[: layout[4].offset + 100])  # 1 whole sample left
    urls = f"{tmp_path}/*.tar"
    full = _take(_train_loader(urls, start=0, num_workers=2), 12)
    resumed = _take(_train_loader(urls, start=7, num_workers=2), 5)
    for got, want in zip(resumed, full[7:]):
        assert torch.equal(got["sample_indices"], want["sample_indices"])
        assert torch.equal(got["collated_global_crops"], want["collated_global_crops"])
    truncated_ids = {int(i) for batch in full for i in batch["sample_indices"] if i // SAMPLES_PER_SHARD_LIMIT == 2}
    assert truncated_ids == {2 * SAMPLES_PER_SHARD_LIMIT}
