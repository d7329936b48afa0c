"""The registry behind dataset strings ``Name:key=value:...``: dataset name → factory and its accepted keys.

Other modules add datasets with :func:`register_dataset` (e.g. a WebDataset or VOC reader) without touching the
parser in :mod:`franca.data.loaders`.
"""

from dataclasses import dataclass
from typing import Callable

from torch.utils.data import Dataset


@dataclass(frozen=True)
class DatasetSpec:
    """``factory(transform=..., target_transform=..., **{key: value})`` builds the dataset; values are strings."""

    name: str
    factory: Callable[..., Dataset]
    keys: tuple[str, ...]
    required_keys: tuple[str, ...] = ()


_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(
    name: str, factory: Callable[..., Dataset], keys: tuple[str, ...], required_keys: tuple[str, ...] = ()
) -> None:
    """Makes ``name`` usable in dataset strings; re-registering a name replaces its entry."""
    unknown_required = set(required_keys) - set(keys)
    if unknown_required:
        raise ValueError(f"dataset {name!r}: required keys {sorted(unknown_required)} are not among keys {keys}")
    _REGISTRY[name] = DatasetSpec(name, factory, tuple(keys), tuple(required_keys))


def registered_dataset_names() -> list[str]:
    return sorted(_REGISTRY)


def get_dataset_spec(name: str) -> DatasetSpec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(registered_dataset_names())}")
    return _REGISTRY[name]
