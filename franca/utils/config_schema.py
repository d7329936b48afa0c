"""A config loader whose defaults YAML file is also its schema: the training config and the RASA config share it.

Every valid key is a key of the defaults file, and its value must have the type of the default there (an int is
accepted where a float is expected, a missing string is read as ''); enumerated keys are checked against their
allowed values. An unknown key (with the closest valid keys as suggestions), a wrong type or a bad choice raises
:class:`ConfigError` naming the dotted key, the value and the fix. Range rules and constraints between keys belong to
each config (``franca.train.config`` for training, ``rasa.config`` for RASA).
"""

import difflib
import os
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from franca.utils.atomic import atomic_write

_TYPE_NAMES = {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string"}


class ConfigError(ValueError):
    """A configuration file, override or value that cannot be used."""


@dataclass(frozen=True)
class _Field:
    """The type rule of one leaf key, derived from its default."""

    key: str
    default: Any
    kind: type
    item_kind: type | None = None
    length: int | None = None
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind is list:
            size = f"{self.length} " if self.length else ""
            return f"a list of {size}{_TYPE_NAMES[self.item_kind].removeprefix('a ').removeprefix('an ')}s"
        return _TYPE_NAMES[self.kind]


class ConfigSchema:
    """A defaults YAML file that doubles as the schema of its keys, and the loader that validates against it.

    ``defaults_file`` may also be a sequence of files, merged in order: a command whose config extends another's
    (``python -m franca.distill`` adds a ``distill`` section and ``teacher.weights`` to the training keys) lists the
    shared file first and its own after it, so the shared file stays the one schema of the shared keys.

    ``choices`` maps fnmatch patterns of dotted keys to their allowed values; ``list_item_types`` gives the element
    type of the lists whose default is empty; ``pairs`` are the lists of exactly two numbers. ``label`` names the
    config in messages (``"RASA config"``) and ``example`` is a valid override shown when one is malformed.
    """

    def __init__(
        self,
        defaults_file: Path | Sequence[Path],
        choices: dict[str, tuple[str, ...]] | None = None,
        list_item_types: dict[str, type] | None = None,
        pairs: tuple[str, ...] = (),
        label: str = "config",
        example: str = "optim.epochs=100",
    ):
        files = [defaults_file] if isinstance(defaults_file, (str, os.PathLike)) else list(defaults_file)
        self.defaults_files = tuple(Path(file) for file in files)
        self.choices = dict(choices or {})
        self.list_item_types = dict(list_item_types or {})
        self.pairs = pairs
        self.label = label
        self.example = example

    def _defaults(self) -> DictConfig:
        """The defaults files merged in order."""
        return OmegaConf.merge(*(OmegaConf.load(file) for file in self.defaults_files))

    def _field_for(self, key: str, default: Any) -> _Field:
        choices = next((allowed for pattern, allowed in self.choices.items() if fnmatchcase(key, pattern)), ())
        if isinstance(default, list):
            item_kind = self.list_item_types.get(key) or type(default[0])
            return _Field(key, default, list, item_kind, 2 if key in self.pairs else None)
        return _Field(key, default, type(default), choices=choices)

    @cached_property
    def _schema(self) -> tuple[dict[str, _Field], frozenset[str]]:
        """Leaf fields and section paths of the defaults file."""
        fields: dict[str, _Field] = {}
        sections: set[str] = set()

        def visit(node: dict, prefix: str) -> None:
            for name, value in node.items():
                key = prefix + name
                if isinstance(value, dict):
                    sections.add(key)
                    visit(value, key + ".")
                else:
                    fields[key] = self._field_for(key, value)

        visit(OmegaConf.to_container(self._defaults()), "")
        return fields, frozenset(sections)

    @property
    def fields(self) -> dict[str, _Field]:
        return self._schema[0]

    def _suggestion(self, key: str) -> str:
        """Up to three valid keys closest to ``key`` (whole dotted key first, else the last name alone)."""
        fields, sections = self._schema
        known = sorted(fields) + sorted(sections)
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        if not close:
            leaf = key.rsplit(".", 1)[-1]
            close_leaves = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in known], n=3, cutoff=0.6)
            close = [k for k in known if k.rsplit(".", 1)[-1] in close_leaves][:3]
        if not close:
            return f"the valid keys are those of {', '.join(map(str, self.defaults_files))}"
        quoted = [repr(k) for k in close]
        return "did you mean " + (quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]) + "?"

    def _check_keys(self, node: dict, prefix: str, source: str) -> None:
        """Reject keys that the defaults do not have, and sections set to values or values set to sections."""
        fields, sections = self._schema
        for name, value in node.items():
            key = f"{prefix}{name}"
            if key in sections:
                if not isinstance(value, dict):
                    raise ConfigError(
                        f"{key} is a section of the {self.label}, but {source} sets it to {value!r}; "
                        f"set its keys instead, e.g. {key}.<name>=<value>"
                    )
                self._check_keys(value, key + ".", source)
            elif key in fields:
                if isinstance(value, dict):
                    raise ConfigError(
                        f"{self.label} key {key} expects {fields[key].describe()}, but {source} sets it to the "
                        f"mapping {value!r}; give a single value, e.g. {key}={fields[key].default!r}"
                    )
            else:
                full_key = _first_leaf(key, value)
                raise ConfigError(f"unknown {self.label} key {full_key!r} in {source}; {self._suggestion(full_key)}")

    def _load_file(self, config_file: str | os.PathLike) -> DictConfig:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(
                f"{self.label} file {str(path)!r} does not exist (or is not a file); pass an existing YAML file"
            )
        try:
            cfg = OmegaConf.load(path)
        except Exception as error:
            raise ConfigError(f"{self.label} file {str(path)!r} is not valid YAML: {error}") from error
        if not isinstance(cfg, DictConfig):
            raise ConfigError(
                f"{self.label} file {str(path)!r} must hold a mapping of sections (e.g. `optim:`), not a list"
            )
        if not cfg:
            raise ConfigError(
                f"{self.label} file {str(path)!r} is empty (no keys); pass the recipe you mean, or leave the file out "
                f"to use the defaults of {' + '.join(file.name for file in self.defaults_files)} on purpose"
            )
        self._check_keys(OmegaConf.to_container(cfg), "", f"{self.label} file {str(path)!r}")
        return cfg

    def _parse_override(self, item: str) -> DictConfig:
        if not item.isascii() and any("\udc80" <= char <= "\udcff" for char in item):
            raise ConfigError(
                f"override {item.encode(errors='surrogateescape')!r} holds bytes that are not UTF-8 text (a path "
                "named in another encoding); the config and its record are text: pass a UTF-8 path, e.g. a symlink "
                "to that folder"
            )
        if "=" not in item:
            raise ConfigError(f"override {item!r} has no '='; write it as key=value, e.g. {self.example}")
        try:
            cfg = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as error:
            raise ConfigError(f"override {item!r} cannot be parsed: {error}; write it as key=value") from error
        self._check_keys(OmegaConf.to_container(cfg), "", f"override {item!r}")
        return cfg

    def explicit_keys(self, config_file: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> set[str]:
        """The dotted leaf keys that ``config_file`` or ``overrides`` set (those left to the defaults are not)."""
        layers = [self._load_file(config_file)] if config_file is not None else []
        layers += [self._parse_override(item) for item in overrides]
        keys: set[str] = set()

        def visit(node: dict, prefix: str) -> None:
            for name, value in node.items():
                if isinstance(value, dict):
                    visit(value, f"{prefix}{name}.")
                else:
                    keys.add(f"{prefix}{name}")

        for layer in layers:
            visit(OmegaConf.to_container(layer), "")
        return keys

    def load(self, config_file: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> DictConfig:
        """Defaults ← ``config_file`` ← ``overrides`` (``key=value`` strings), type-checked; in struct mode.

        Struct mode makes setting a key that the schema lacks an error, so a typo in code fails as loudly as one in a
        file.
        """
        layers = [self._defaults()]
        if config_file is not None:
            layers.append(self._load_file(config_file))
        layers.extend(self._parse_override(item) for item in overrides)
        try:
            merged = OmegaConf.to_container(OmegaConf.merge(*layers), resolve=True)
        except OmegaConfBaseException as error:
            raise ConfigError(f"{self.label} cannot be merged or resolved: {error}") from error
        for key, field in self.fields.items():
            _set(merged, key, _coerce(field, get_key(merged, key)))
        cfg = OmegaConf.create(merged)
        OmegaConf.set_struct(cfg, True)
        return cfg


def _first_leaf(key: str, value: Any) -> str:
    """The dotted key of the first value under ``key`` (so an unknown section is reported by a full key)."""
    while isinstance(value, dict) and value:
        name, value = next(iter(value.items()))
        key = f"{key}.{name}"
    return key


def _type_error(field: _Field, value: Any, key: str | None = None) -> ConfigError:
    return ConfigError(
        f"config key {key or field.key} has value {value!r} ({type(value).__name__}); expected {field.describe()} "
        f"(default: {field.default!r}); fix it in the config file or override it, e.g. {field.key}={field.default}"
    )


def _coerce_scalar(field: _Field, kind: type, value: Any, key: str) -> Any:
    if kind is bool and isinstance(value, bool):
        return value
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and is_number:
        return float(value)
    if kind is str and (value is None or isinstance(value, str) or is_number):
        return "" if value is None else str(value)
    raise _type_error(field, value, key)


def _coerce(field: _Field, value: Any) -> Any:
    """``value`` converted to the field's type, or a :class:`ConfigError` naming the key."""
    if field.kind is list:
        if not isinstance(value, list) or (field.length is not None and len(value) != field.length):
            raise _type_error(field, value)
        return [_coerce_scalar(field, field.item_kind, v, f"{field.key}[{i}]") for i, v in enumerate(value)]
    if field.kind is str and isinstance(value, bool) and "true" in field.choices:
        value = "true" if value else "false"  # YAML reads `compile: true` as a boolean; the choice is the word
    value = _coerce_scalar(field, field.kind, value, field.key)
    if field.choices and value not in field.choices:
        raise _type_error(field, value)
    return value


def get_key(container: dict, key: str) -> Any:
    """The value of dotted ``key`` in a nested dict."""
    for name in key.split("."):
        container = container[name]
    return container


def _set(container: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for name in parents:
        container = container[name]
    container[leaf] = value


def save_config(cfg: DictConfig, path: str | os.PathLike) -> Path:
    """Write ``cfg`` as YAML to ``path`` atomically (temporary file in the same folder, then rename); returns path."""
    return atomic_write(path, OmegaConf.to_yaml(cfg, resolve=True))
