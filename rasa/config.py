"""RASA training configuration: ``rasa/defaults.yaml`` ← config file ← ``key=value`` overrides, validated.

As for pretraining (:mod:`franca.config`), the defaults file is the schema: an unknown key or a value of the wrong type
raises :class:`franca.config.ConfigError` naming the dotted key and the fix. The type rules are franca.config's.
"""

import difflib
import os
from functools import cache
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from franca.config import ConfigError, _coerce, _Field, _field_for

DEFAULTS_FILE = Path(__file__).parent / "defaults.yaml"
REGRESSOR_CHOICES = ("trained", "cross_covariance")


@cache
def _fields() -> dict[str, _Field]:
    fields: dict[str, _Field] = {}

    def visit(node: dict, prefix: str) -> None:
        for name, value in node.items():
            if isinstance(value, dict):
                visit(value, f"{prefix}{name}.")
            else:
                fields[prefix + name] = _field_for(prefix + name, value)

    visit(OmegaConf.to_container(OmegaConf.load(DEFAULTS_FILE)), "")
    return fields


def _leaves(node: dict, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for name, value in node.items():
        if isinstance(value, dict) and f"{prefix}{name}" not in _fields():
            yield from _leaves(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


def _check_keys(cfg: DictConfig, source: str) -> None:
    for key, _ in _leaves(OmegaConf.to_container(cfg)):
        if key not in _fields():
            close = difflib.get_close_matches(key, list(_fields()), n=3, cutoff=0.6)
            hint = (
                f"did you mean {', '.join(map(repr, close))}?"
                if close
                else f"the valid keys are those of {DEFAULTS_FILE}"
            )
            raise ConfigError(f"unknown RASA config key {key!r} in {source}; {hint}")


def _load_layer(config_file: str | os.PathLike) -> DictConfig:
    path = Path(config_file)
    if not path.is_file():
        raise ConfigError(
            f"RASA config file {str(path)!r} does not exist (or is not a file); pass an existing YAML file"
        )
    try:
        cfg = OmegaConf.load(path)
    except Exception as error:
        raise ConfigError(f"RASA config file {str(path)!r} is not valid YAML: {error}") from error
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"RASA config file {str(path)!r} must hold a mapping of sections (e.g. `train:`)")
    _check_keys(cfg, f"config file {str(path)!r}")
    return cfg


def _override_layer(item: str) -> DictConfig:
    if "=" not in item:
        raise ConfigError(f"override {item!r} has no '='; write it as key=value, e.g. train.end_round=3")
    try:
        cfg = OmegaConf.from_dotlist([item])
    except OmegaConfBaseException as error:
        raise ConfigError(f"override {item!r} cannot be parsed: {error}; write it as key=value") from error
    _check_keys(cfg, f"override {item!r}")
    return cfg


def _check_values(cfg: DictConfig) -> None:
    problems = []
    if not cfg.model.weights:
        problems.append("model.weights is empty: give the frozen backbone, e.g. model.weights=franca_vitb14:IN21K")
    if not cfg.data.dataset:
        problems.append("data.dataset is empty: give the training images, e.g. data.dataset=ImageFolder:root=/data")
    if not 0 <= cfg.train.start_round < cfg.train.end_round:
        problems.append(
            f"train.start_round={cfg.train.start_round} and train.end_round={cfg.train.end_round} must satisfy "
            "0 <= start_round < end_round"
        )
    if cfg.train.start_round > 0 and not cfg.model.init_head:
        problems.append(
            f"train.start_round={cfg.train.start_round} needs model.init_head: the RASA file of round "
            f"{cfg.train.start_round - 1} ({cfg.train.start_round - 1} pre-layers + pos_pred)"
        )
    for key in ("train.epochs_per_round", "train.batch_size", "data.image_size", "val.image_size", "val.max_images"):
        if OmegaConf.select(cfg, key) < 1:
            problems.append(f"{key}={OmegaConf.select(cfg, key)} must be >= 1")
    if cfg.train.regressor not in REGRESSOR_CHOICES:
        problems.append(f"train.regressor={cfg.train.regressor!r} is unknown; choose one of {REGRESSOR_CHOICES}")
    if not 0 < cfg.data.min_scale <= cfg.data.max_scale <= 1:
        problems.append(
            f"data.min_scale={cfg.data.min_scale}, data.max_scale={cfg.data.max_scale}: need 0 < min <= max <= 1"
        )
    for key in ("optim.lr", "optim.final_lr", "optim.weight_decay", "optim.clip_grad", "train.seed"):
        if OmegaConf.select(cfg, key) < 0:
            problems.append(f"{key}={OmegaConf.select(cfg, key)} must be >= 0")
    if problems:
        raise ConfigError("invalid RASA config: " + "; ".join(problems))


def load_rasa_config(config_file: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Defaults ← ``config_file`` ← ``overrides``, type-checked and value-checked; returned in struct mode."""
    layers = [OmegaConf.load(DEFAULTS_FILE)]
    if config_file is not None:
        layers.append(_load_layer(config_file))
    layers.extend(_override_layer(item) for item in overrides)
    merged = OmegaConf.to_container(OmegaConf.merge(*layers), resolve=True)
    for key, field in _fields().items():
        section, name = key.rsplit(".", 1)
        node = merged
        for part in section.split("."):
            node = node[part]
        node[name] = _coerce(field, node[name])
    cfg = OmegaConf.create(merged)
    OmegaConf.set_struct(cfg, True)
    _check_values(cfg)
    return cfg
