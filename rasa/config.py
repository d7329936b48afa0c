"""RASA training configuration: ``rasa/defaults.yaml`` ← config file ← ``key=value`` overrides, validated.

As for pretraining (:mod:`franca.train.config`), the defaults file is the schema
(:class:`franca.utils.config_schema.ConfigSchema`): an unknown key or a value of the wrong type raises its
:class:`~franca.utils.config_schema.ConfigError` naming the dotted key and the fix.
"""

import os
from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig, OmegaConf

from franca.utils.config_schema import ConfigError, ConfigSchema

DEFAULTS_FILE = Path(__file__).parent / "defaults.yaml"
REGRESSOR_CHOICES = ("trained", "cross_covariance")
RASA_SCHEMA = ConfigSchema(
    DEFAULTS_FILE, {"train.regressor": REGRESSOR_CHOICES}, label="RASA config", example="train.end_round=3"
)


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
    cfg = RASA_SCHEMA.load(config_file, overrides)
    _check_values(cfg)
    return cfg
