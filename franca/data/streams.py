"""The training stream over WebDataset shards: loader machinery on top of :class:`WebDatasetShards` (the shard
reading), giving the samples and batches that :func:`franca.data.loaders.make_train_data_loader` gives for map
datasets. The stream order (which rank, worker and iteration reads which sample) is described in
:mod:`franca.data.datasets.webdataset`.
"""

from typing import Any, Callable, Iterator

from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from franca.data.datasets.webdataset import SAMPLES_PER_SHARD_LIMIT, RawSample, WebDatasetShards
from franca.data.loaders import train_worker_loader
from franca.data.samplers import SampleKey, check_stream_settings
from franca.data.seeded_transform import seeded_global_rngs


class WebDatasetTrainStream(IterableDataset):
    """The samples ``(transform(image), target, SampleKey)`` of one rank for the training loader, in the order described
    in :mod:`franca.data.datasets.webdataset`; each worker slot plays one stream, shifted so that batch k of the loader
    is iteration ``start_iteration + k``."""

    def __init__(
        self,
        shards: WebDatasetShards,
        transform: Callable | None,
        seed: int,
        batch_size_per_rank: int,
        start_iteration: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        check_stream_settings(batch_size_per_rank, seed, start_iteration, rank, world_size)
        self.shards = shards
        self.transform = transform
        self.seed = seed
        self.batch_size = batch_size_per_rank
        self.start_iteration = start_iteration
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[tuple[Any, int, SampleKey]]:
        worker = get_worker_info()
        slot, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        first_iteration = self.start_iteration + slot
        stream = self.rank * num_workers + first_iteration % num_workers
        start_position = (first_iteration // num_workers) * self.batch_size
        raw = self.shards.stream_samples(self.seed, stream, self.world_size * num_workers, start_position)
        pending: list[tuple[RawSample, int]] = []
        produced = 0
        for sample, pass_index in raw:
            image = self.shards.decode(sample)
            if image is None:
                pending.append((sample, pass_index))
                continue
            for slot_sample, slot_pass in pending + [(sample, pass_index)]:
                iteration = first_iteration + (produced // self.batch_size) * num_workers
                key = SampleKey(
                    slot_sample.shard_id * SAMPLES_PER_SHARD_LIMIT + slot_sample.index, slot_pass, iteration
                )
                yield self._transform(image, sample.target, key)
                produced += 1
            pending.clear()

    def _transform(self, image: Image.Image, target: int, key: SampleKey) -> tuple[Any, int, SampleKey]:
        with seeded_global_rngs([self.seed, key.pass_index, key.index]):
            crops = self.transform(image) if self.transform is not None else image
        return crops, target, key


def make_webdataset_train_loader(
    dataset: WebDatasetShards,
    transform: Callable | None,
    collate: Callable[[list[Any]], Any],
    batch_size_per_rank: int,
    seed: int,
    start_iteration: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool | None = None,
    prefetch_factor: int = 2,
) -> DataLoader:
    """:func:`franca.data.loaders.make_train_data_loader` for shards: same arguments, same samples and batches (batch
    k is iteration ``start_iteration + k``). The order depends on ``world_size`` and ``num_workers`` (module
    docstring), so a resumed run must keep both."""
    if not isinstance(dataset, WebDatasetShards):
        raise TypeError(f"make_webdataset_train_loader needs a WebDatasetShards, got {type(dataset).__name__}")
    if dataset.transform is not None or dataset.target_transform is not None:
        raise ValueError("give the training transform to make_webdataset_train_loader, not to the WebDatasetShards")
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers} must be >= 0")
    dataset.check_stream_count(world_size * max(1, num_workers))
    stream = WebDatasetTrainStream(dataset, transform, seed, batch_size_per_rank, start_iteration, rank, world_size)
    return train_worker_loader(stream, batch_size_per_rank, collate, num_workers, pin_memory, prefetch_factor)
