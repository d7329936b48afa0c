"""``WebDataset:urls=PATTERN[:counts=FILE]``: image samples streamed from tar shards (replaces the
LAION loader of valeoai/Franca ``franca/data/datasets/``, ``MultishardStreamer``).

A shard is a tar file whose members are grouped into samples by key: the member path up to the first dot of its file
name (``000042.jpg``, ``000042.json`` and ``000042.txt`` form sample ``000042``), consecutive members with one key
forming one sample, as img2dataset writes them. A sample's image is its first ``jpg/jpeg/png/webp`` member; an
optional ``.cls`` member holds an integer label (else the target is -1); other members (``.json``, ``.txt``...) are
ignored, and a group without an image is not a sample. Shards are read sequentially with :mod:`tarfile`; no
dependency on the ``webdataset`` package.

``PATTERN`` is a brace pattern (``/data/{00000..01023}.tar``, ``{a,b}``), a glob (``/data/*.tar``) or a list file
(one shard path a line, relative to the list file; ``#`` comments). Shards are local files (mounted file systems
included); the i-th resolved shard has id i.

Training stream (:func:`franca.data.streams.make_webdataset_train_loader`): rank r with W loader workers owns W
streams (s = r·W + ℓ, ℓ < W) out of S = world_size·W. In stream pass p, the shards are permuted by (seed, p) and
stream s reads shards s, s + S, s + 2S, ... of that permutation, in order (no shuffle within a shard: shards must be
shuffled when written, as img2dataset's are); the passes follow one another forever. Iteration i of rank r is the
(i // W)-th batch of stream ℓ = i mod W. So the data of iteration i is a function of (seed, world_size, num_workers,
i): a run restarted at iteration k skips, in each stream, the samples of the iterations before k — walking tar
headers only, or whole shards at once when ``counts=`` gives the samples per shard — and sees exactly what an
uninterrupted run sees. Resuming therefore needs the same world size and ``train.num_workers``.

Unreadable images follow the policy of :mod:`franca.data.datasets.base`: each is warned about and counted, its
stream position gets the next readable image of the stream (so positions, and resume, are unchanged), and reading
stops when more than 1% of the attempts failed. A truncated or damaged shard is read up to its last sample whose
members all precede the damage; the rest of the shard is skipped with an :class:`UnreadableImageWarning` naming the
shard, and counted as one failed read. A shard must end with tar's end-of-archive marker (zero blocks, written by
tarfile, GNU tar and img2dataset): a file that stops at a member boundary without it counts as truncated, since
members of its last sample may be missing. Images are decoded with the dataset's ``image_decoding``
(:mod:`franca.data.image_decoding`).
"""

import glob
import itertools
import json
import os
import re
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from franca.data.datasets.base import (
    MAX_FAILURE_FRACTION,
    MIN_ATTEMPTS_BEFORE_CHECK,
    READ_ERRORS,
    ReadFailureCounter,
    TooManyUnreadableImagesError,
    UnreadableImageWarning,
    decode_image,
)
from franca.data.datasets.registry import register_dataset
from franca.data.image_decoding import DEFAULT_DECODING, ImageDecoding
from franca.data.samplers import pass_permutation
from franca.utils.atomic import atomic_write

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
# Sample ids are shard_id · 2**24 + index in shard: unique per image, independent of the rank/worker split.
SAMPLES_PER_SHARD_LIMIT = 1 << 24
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


def expand_braces(pattern: str) -> list[str]:
    """``"a{00..02}b{x,y}"`` → ``a00bx a00by a01bx ... a02by``: numeric ranges keep the zero padding of their bounds,
    comma lists are taken as is, several groups expand as a product (left to right)."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match[1], pattern[: match.start()], pattern[match.end() :]
    numeric = _RANGE.fullmatch(body)
    if numeric:
        low, high = int(numeric[1]), int(numeric[2])
        if low > high:
            raise ValueError(
                f"brace range {{{body}}} in {pattern!r} is descending; write {{{numeric[2]}..{numeric[1]}}}"
            )
        width = max(len(numeric[1]), len(numeric[2]))
        items = [str(value).zfill(width) for value in range(low, high + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise ValueError(f"brace group {{{body}}} in {pattern!r} is neither a range {{a..b}} nor a list {{x,y}}")
    return [head + item + rest for item in items for rest in expand_braces(tail)]


def _is_list_file(urls: str) -> bool:
    path = Path(urls).expanduser()
    return path.is_file() and path.suffix.lower() != ".tar" and not tarfile.is_tarfile(path)


def resolve_shards(urls: str) -> list[Path]:
    """The shard files named by ``urls`` (brace pattern, glob or list file), in pattern order; clear errors when the
    pattern is remote or names missing files."""
    if "://" in urls or urls.startswith("pipe:"):
        raise ValueError(
            f"WebDataset urls={urls!r} is remote; franca reads local shard files only: copy or mount the shards and "
            "give their local path pattern"
        )
    if _is_list_file(urls):
        list_file = Path(urls).expanduser()
        lines = [line.strip() for line in list_file.read_text().splitlines()]
        candidates = [list_file.parent / line for line in lines if line and not line.startswith("#")]
    else:
        candidates = []
        for item in expand_braces(urls):
            if glob.has_magic(item):
                found = sorted(glob.glob(os.path.expanduser(item)))
                if not found:
                    raise FileNotFoundError(f"WebDataset urls={urls!r}: the glob {item!r} matches no file")
                candidates.extend(Path(path) for path in found)
            else:
                candidates.append(Path(item).expanduser())
    if not candidates:
        raise FileNotFoundError(f"WebDataset urls={urls!r} names no shard")
    missing = [str(path) for path in candidates if not path.is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(
            f"WebDataset urls={urls!r}: {len(missing)} of {len(candidates)} shard files do not exist ({shown}); "
            "fix the pattern (see dataset_prep.md)"
        )
    return candidates


def _split_member_name(name: str) -> tuple[str, str]:
    """``"dir/000042.seg.png"`` → (``"dir/000042"``, ``"seg.png"``): key up to the file name's first dot."""
    directory, _, file_name = name.rpartition("/")
    stem, dot, suffix = file_name.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, suffix.lower() if dot else ""


@dataclass(frozen=True)
class RawSample:
    """One sample of a shard: ``index`` within the shard, the image member's name and bytes (None when skipped)."""

    shard_id: int
    index: int
    member: str
    image_bytes: bytes | None
    target: int


class TruncatedShardError(tarfile.ReadError):
    """A shard ends, or is damaged, before its end-of-archive marker; ``samples_read`` samples preceded the damage."""

    def __init__(self, path: str | os.PathLike, samples_read: int, cause: Exception):
        super().__init__(
            f"shard {path} is truncated or damaged after its first {samples_read} samples ({type(cause).__name__}: "
            f"{cause}); the rest of it cannot be read: copy or download the shard again, or rewrite it"
        )
        self.path = str(path)
        self.samples_read = samples_read


def iter_shard(path: str | os.PathLike, shard_id: int = 0, skip: int = 0) -> Iterator[RawSample]:
    """The samples of one shard in member order; the first ``skip`` are walked over reading their headers only.

    A truncated or damaged shard yields the samples before the damage, then raises :class:`TruncatedShardError`.
    """
    index = 0
    try:
        with tarfile.open(path, mode="r:") as tar:
            for image, label in _image_groups(tar):
                data = tar.extractfile(image).read() if index >= skip else None
                target = _read_label(tar, label, path) if label is not None and data is not None else -1
                yield RawSample(shard_id, index, image.name, data, target)
                index += 1
    except (tarfile.TarError, EOFError) as error:
        raise TruncatedShardError(path, index, error) from error


def _image_groups(tar: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarInfo | None]]:
    """(image member, label member or None) of each sample. A group is given only once it is known whole: when the
    next group's header, or the end-of-archive marker, has been read."""
    key, image, label = None, None, None
    while (member := tar.next()) is not None:
        if not member.isfile():
            continue
        member_key, suffix = _split_member_name(member.name)
        if member_key != key:
            tar.members = []  # TarFile keeps every header it read; a shard may hold millions of members
            if image is not None:
                yield image, label
            key, image, label = member_key, None, None
        if suffix in IMAGE_SUFFIXES and image is None:
            image = member
        elif suffix == "cls":
            label = member
    _require_end_of_archive(tar)
    if image is not None:
        yield image, label


def _require_end_of_archive(tar: tarfile.TarFile) -> None:
    """tarfile stops without an error at a partial or damaged header; a whole shard has zero bytes there (the
    end-of-archive marker), so anything else, or the end of the file, means the shard is truncated or damaged."""
    tar.fileobj.seek(tar.offset)  # tar.offset: where tarfile looked for the header it did not find
    block = tar.fileobj.read(tarfile.BLOCKSIZE)
    if not block or block.count(0) != len(block):
        raise tarfile.ReadError(f"no end-of-archive marker at byte {tar.offset}")


def _read_label(tar: tarfile.TarFile, label: tarfile.TarInfo, path: str | os.PathLike) -> int:
    text = tar.extractfile(label).read().decode(errors="replace").strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"label member {label.name} of shard {path} holds {text[:40]!r}, not an integer") from None


def count_shard_samples(path: str | os.PathLike) -> int:
    """The number of samples of a shard, from its tar headers (no image is read); for a truncated shard the samples
    before the damage (the ones a stream reads), with an :class:`UnreadableImageWarning`."""
    try:
        return sum(1 for _ in iter_shard(path, skip=SAMPLES_PER_SHARD_LIMIT))
    except TruncatedShardError as error:
        warnings.warn(str(error), UnreadableImageWarning, stacklevel=2)
        return error.samples_read


def write_sample_counts(urls: str, output: str | os.PathLike) -> Path:
    """Count the samples of every shard of ``urls`` and write ``{shard file name: count}`` as JSON (atomically), for
    ``WebDataset:urls=...:counts=<output>`` (whole shards are then skipped at once on resume)."""
    from franca.utils.logging import Progress

    shards = resolve_shards(urls)
    _require_unique_names(shards, urls)
    progress = Progress("Counting samples", len(shards))
    counts = {}
    for done, shard in enumerate(shards, start=1):
        counts[shard.name] = count_shard_samples(shard)
        if done % 16 == 0 or done == len(shards):
            progress.print(done, f"{sum(counts.values())} samples")
    output = Path(output)
    atomic_write(output, json.dumps(counts, indent=0))
    return output


def _require_unique_names(shards: list[Path], urls: str) -> None:
    names = [shard.name for shard in shards]
    if len(set(names)) != len(names):
        raise ValueError(f"WebDataset urls={urls!r}: shard file names repeat, so a counts file cannot name them")


def _load_counts(counts_file: str, shards: list[Path], urls: str) -> list[int]:
    _require_unique_names(shards, urls)
    recorded = json.loads(Path(counts_file).expanduser().read_text())
    missing = [shard.name for shard in shards if shard.name not in recorded]
    if missing:
        raise ValueError(
            f"counts file {counts_file!r} lacks {len(missing)} shard(s) of urls={urls!r} (e.g. {missing[0]}); "
            "rebuild it with franca.data.datasets.webdataset.write_sample_counts"
        )
    return [int(recorded[shard.name]) for shard in shards]


class WebDatasetShards(IterableDataset):
    """The shards of ``urls``. Iterating it gives one ordered pass of ``(transform(image), target)`` (shards split
    over DataLoader workers, unreadable images skipped); training uses
    :func:`franca.data.streams.make_webdataset_train_loader`. Images are decoded with :attr:`image_decoding` (set by
    :func:`franca.data.loaders.make_dataset`)."""

    image_decoding: ImageDecoding = DEFAULT_DECODING

    def __init__(
        self,
        urls: str,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        counts: str | None = None,
    ):
        self.urls = urls
        self.shards = resolve_shards(urls)
        self.transform = transform
        self.target_transform = target_transform
        self.sample_counts = _load_counts(counts, self.shards, urls) if counts else None
        self.read_failures = ReadFailureCounter()

    @property
    def num_samples(self) -> int | None:
        """The number of samples when a counts file was given, else None (unknown without reading every shard)."""
        return sum(self.sample_counts) if self.sample_counts is not None else None

    def shard_sample_count(self, shard_id: int) -> int:
        if self.sample_counts is not None:
            return self.sample_counts[shard_id]
        return count_shard_samples(self.shards[shard_id])

    def decode(self, sample: RawSample) -> Image.Image | None:
        """The sample's RGB image, or None after warning, counting and checking the failure rate."""
        try:
            image = decode_image(sample.image_bytes, self.image_decoding)
        except READ_ERRORS as error:
            self.read_failures.record(failed=True)
            warnings.warn(
                f"skipping unreadable image {sample.member} in shard {self.shards[sample.shard_id]} "
                f"({type(error).__name__}: {error})",
                UnreadableImageWarning,
                stacklevel=2,
            )
            self._check_failure_rate()
            return None
        self.read_failures.record(failed=False)
        self._check_failure_rate()
        return image

    def read_shard(self, shard_id: int, skip: int = 0) -> Iterator[RawSample]:
        """The samples of shard ``shard_id`` (:func:`iter_shard`); a truncated shard ends early, warned about by name
        and counted as one failed read."""
        try:
            yield from iter_shard(self.shards[shard_id], shard_id, skip)
        except TruncatedShardError as error:
            self.read_failures.record(failed=True)
            warnings.warn(f"skipping the rest of a shard: {error}", UnreadableImageWarning, stacklevel=2)
            self._check_failure_rate()

    def _check_failure_rate(self) -> None:
        attempted, failed = self.read_failures.attempted, self.read_failures.failed
        if attempted >= MIN_ATTEMPTS_BEFORE_CHECK and failed > MAX_FAILURE_FRACTION * attempted:
            raise TooManyUnreadableImagesError(
                f"{failed} of {attempted} image reads failed (more than {MAX_FAILURE_FRACTION:.0%}) in WebDataset "
                f"urls={self.urls!r}; check the shards (see the UnreadableImageWarning messages) and rewrite them"
            )

    def _apply_transforms(self, image: Image.Image, target: int) -> tuple[Any, Any]:
        image = self.transform(image) if self.transform is not None else image
        target = self.target_transform(target) if self.target_transform is not None else target
        return image, target

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for shard_id in range(worker_id, len(self.shards), num_workers):
            for sample in self.read_shard(shard_id):
                image = self.decode(sample)
                if image is not None:
                    yield self._apply_transforms(image, sample.target)

    def check_stream_count(self, num_streams: int) -> None:
        if num_streams > len(self.shards):
            raise ValueError(
                f"WebDataset urls={self.urls!r} has {len(self.shards)} shards for {num_streams} streams "
                "(world size x max(1, train.num_workers)); every stream needs a shard: lower train.num_workers or "
                "split the data into more shards"
            )

    def stream_shards(self, seed: int, pass_index: int, stream: int, num_streams: int) -> list[int]:
        """The shard ids that ``stream`` of ``num_streams`` reads in pass ``pass_index``, in order."""
        order = pass_permutation(len(self.shards), seed, pass_index)
        return order[stream::num_streams].tolist()

    def stream_samples(
        self, seed: int, stream: int, num_streams: int, start_position: int = 0
    ) -> Iterator[tuple[RawSample, int]]:
        """The infinite stream ``stream`` as (raw sample, pass) from ``start_position`` on: the samples before it are
        skipped shard by shard (counts) or header by header."""
        self.check_stream_count(num_streams)
        remaining = start_position
        for pass_index in itertools.count():
            yielded = False
            for shard_id in self.stream_shards(seed, pass_index, stream, num_streams):
                skip = 0
                if remaining:
                    size = self.shard_sample_count(shard_id)
                    if size <= remaining:
                        remaining -= size
                        yielded = yielded or size > 0
                        continue
                    skip, remaining = remaining, 0
                for sample in self.read_shard(shard_id, skip):
                    if sample.image_bytes is not None:
                        yielded = True
                        yield sample, pass_index
            if not yielded:
                names = [self.shards[i].name for i in self.stream_shards(seed, pass_index, stream, num_streams)]
                raise ValueError(f"WebDataset urls={self.urls!r}: shards {names} hold no image sample")


register_dataset("WebDataset", WebDatasetShards, keys=("urls", "counts"), required_keys=("urls",))
