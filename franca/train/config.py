"""Training configuration: defaults ← config file ← ``key=value`` overrides, validated (keys and defaults of
valeoai/Franca ``franca/configs/ssl_default_config.yaml``; changes in docs/deviations.md).

The shipped defaults (``franca/configs/ssl_default_config.yaml``) double as the schema
(:class:`franca.utils.config_schema.ConfigSchema`: keys, types, choices). Here: the training config's allowed values
(:data:`CHOICES`), ranges (:data:`VALUE_RULES`) and constraints between keys (:data:`CONSTRAINTS`). An unknown key, a
wrong type, a bad choice or an out-of-range value raises :class:`ConfigError` naming the dotted key, the value and the
fix.
"""

import math
import os
import warnings
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Callable, Iterable

from omegaconf import DictConfig, OmegaConf

from franca.data.image_decoding import parse_background, parse_max_value
from franca.layers.heads import HEAD_INITS, default_nesting_list
from franca.models.config import POSITION_ENCODINGS, ROPE_COORDINATE_NORMALISATIONS
from franca.models.vision_transformer import ARCHITECTURES, FFN_LAYERS
from franca.train.parallel import SHARDING_STRATEGIES
from franca.train.runtime import DISTRIBUTED_MODES, DTYPE_SETTINGS, SWITCH_SETTINGS
from franca.utils.config_schema import ConfigError, ConfigSchema, get_key

DEFAULT_CONFIG_FILE = Path(__file__).parents[1] / "configs" / "ssl_default_config.yaml"

_FSDP_DTYPES = ("fp32", "fp16", "bf16")

# Allowed values of the enumerated keys; patterns use fnmatch wildcards over the dotted key.
CHOICES: dict[str, tuple[str, ...]] = {
    "train.centering": ("sinkhorn_knopp", "centering"),
    "dino.mrl_input": ("slice", "project"),
    "dino.head_init": HEAD_INITS,
    "compute_precision.dtype": DTYPE_SETTINGS,
    "compute_precision.compile": SWITCH_SETTINGS,
    "compute_precision.chunked_losses": SWITCH_SETTINGS,
    "compute_precision.distributed": DISTRIBUTED_MODES,
    "crops.batched_photometric": SWITCH_SETTINGS,
    "student.pretrained_heads": SWITCH_SETTINGS,
    "student.position_encoding": POSITION_ENCODINGS,
    "student.rope_normalize_coords": ROPE_COORDINATE_NORMALISATIONS,
    "student.arch": tuple(ARCHITECTURES),
    "student.ffn_layer": tuple(FFN_LAYERS),
    "optim.scaling_rule": ("sqrt_wrt_1024",),
    "compute_precision.*.*.sharding_strategy": tuple(SHARDING_STRATEGIES),
    "compute_precision.*.*.mixed_precision.*_dtype": _FSDP_DTYPES,
}
# Keys whose value must also pass a parser; its ValueError (saying what is accepted) becomes a ConfigError.
VALUE_PARSERS: dict[str, Callable[[Any], Any]] = {
    "train.alpha_background": parse_background,
    "train.image_max_value": parse_max_value,
}

# Element types of the lists whose default is empty, and the lists that must hold exactly two numbers.
_LIST_ITEM_TYPES = {"dino.nesting_list": int, "dino.level_weights": float, "ibot.level_weights": float}
_PAIRS = ("ibot.mask_ratio_min_max", "crops.global_crops_scale", "crops.local_crops_scale")
# Keys kept only so that original config files load, with the reason they have no effect.
_IGNORED_WHEN_TRUE = {"train.cache_dataset": "it has no effect (none in the original either)"}


def _check_parsed_values(cfg: DictConfig) -> None:
    """Every key of :data:`VALUE_PARSERS` holds a value its parser accepts."""
    for key, parse in VALUE_PARSERS.items():
        value = OmegaConf.select(cfg, key)
        try:
            parse(value)
        except ValueError as error:
            raise ConfigError(
                f"config key {key}={value!r} is invalid: {error}; fix it in the config file or override it"
            ) from None


TRAINING_SCHEMA = ConfigSchema(DEFAULT_CONFIG_FILE, CHOICES, _LIST_ITEM_TYPES, _PAIRS)


# Value rules: the valid range of each key and the constraints between keys, checked by :func:`validate_values` after
# the type rules, on defaults ← file ← overrides merged. Each failure names the key(s), the value and the fix.


@dataclass(frozen=True)
class ValueRule:
    """The valid values of one key: ``holds(value)``, the rule as text (``">= 1"``) and how to fix a bad value.

    ``per_entry`` applies the rule to each entry of a list value, reported as ``key[i]``.
    """

    text: str
    holds: Callable[[Any], bool]
    fix: str
    per_entry: bool = False

    def problems(self, key: str, value: Any) -> list[str]:
        entries = [(f"{key}[{i}]", v) for i, v in enumerate(value)] if self.per_entry else [(key, value)]
        return [f"{name}={v!r} must be {self.text}; {self.fix}" for name, v in entries if not self.holds(v)]


def at_least(bound: float, fix: str) -> ValueRule:
    return ValueRule(f">= {bound}", lambda value: value >= bound, fix)


def above(bound: float, fix: str) -> ValueRule:
    return ValueRule(f"> {bound}", lambda value: value > bound, fix)


def within(low: float, high: float, fix: str, low_open: bool = False, high_open: bool = False) -> ValueRule:
    """``low <= value <= high`` (``<`` at an open end), written as an interval: ``in (0, 1]``."""

    def holds(value: float) -> bool:
        return (low < value if low_open else low <= value) and (value < high if high_open else value <= high)

    return ValueRule(f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}", holds, fix)


def every_entry(rule: ValueRule) -> ValueRule:
    return replace(rule, per_entry=True)


def fraction_pair(fix: str, positive_min: bool) -> ValueRule:
    """``[min, max]`` with ``0 <= min <= max <= 1`` (``0 < min`` with ``positive_min``)."""
    sign = "<" if positive_min else "<="

    def holds(pair: list[float]) -> bool:
        return (0 < pair[0] if positive_min else 0 <= pair[0]) and pair[0] <= pair[1] <= 1

    return ValueRule(f"[min, max] with 0 {sign} min <= max <= 1", holds, fix)


def _is_true(value: bool) -> bool:
    return value is True


_HEAD_RULES = {
    "head_n_prototypes": at_least(1, "set it to the number of prototypes K of the head, e.g. 65536"),
    "head_bottleneck_dim": at_least(1, "set the bottleneck width, e.g. 256"),
    "head_nlayers": at_least(1, "the released configs use 3"),
    "head_hidden_dim": at_least(1, "set the hidden width of the head's MLP, e.g. 2048"),
}
# fnmatch patterns of dotted keys (as CHOICES) → the rule their values obey. Keys absent here take any value of their
# type: booleans, free strings (paths, weights), the enumerated keys of CHOICES and the keys with a VALUE_PARSERS entry.
VALUE_RULES: dict[str, ValueRule] = {
    "compute_precision.loss_chunk_size": at_least(1, "set it to the rows per chunk of the chunked losses, e.g. 256"),
    "compute_precision.*.*.mixed_precision.buffer_dtype": ValueRule(
        "'fp32'", lambda value: value == "fp32", "FSDP2 keeps buffers in their own dtype; set it to fp32"
    ),
    "dino.loss_weight": at_least(0, "it scales the DINO loss: 1 as the original, 0 turns it off"),
    **{f"dino.{name}": rule for name, rule in _HEAD_RULES.items()},
    "dino.koleo_loss_weight": at_least(0, "0 turns KoLeo off; Franca uses 0.1"),
    "dino.nesting_list": every_entry(
        at_least(1, "each entry is the feature size of one Matryoshka level, e.g. [48, 96, 192, 384, 768]")
    ),
    "dino.level_weights": every_entry(at_least(0, "each entry weights one level's DINO loss; [] gives all 1")),
    "ibot.loss_weight": at_least(0, "it scales the iBOT loss: 1 as the original, 0 turns it off"),
    "ibot.mask_sample_probability": within(0, 1, "set it to the share of global crops that get masks, 0.5 in Franca"),
    "ibot.mask_ratio_min_max": fraction_pair(
        "each masked crop hides a share of its patches drawn in [min, max], e.g. [0.1, 0.65]", False
    ),
    **{f"ibot.{name}": rule for name, rule in _HEAD_RULES.items()},
    "ibot.level_weights": every_entry(at_least(0, "each entry weights one level's iBOT loss; [] gives all 1")),
    "train.batch_size_per_gpu": at_least(1, "set it to the images per process"),
    "train.dataset_path": ValueRule(
        "a dataset string", bool, "name the training images, e.g. ImageNet:split=TRAIN:root=R or ImageFolder:root=R"
    ),
    "train.saveckp_freq": at_least(1, "a checkpoint is written every N epochs of train.OFFICIAL_EPOCH_LENGTH"),
    "train.keep_checkpoints": at_least(1, "set it to the resumable checkpoints to keep, 2 as the original"),
    "train.image_max_megapixels": above(0, "images above it are skipped unread; e.g. 100, or more for larger photos"),
    "train.log_period": at_least(1, "a metrics line is written every N iterations, e.g. 10"),
    "train.seed": at_least(0, "use any non-negative integer"),
    "train.num_workers": at_least(0, "set it to the loader processes per rank; 0 loads in the training process"),
    "train.freeze_backbone_iterations": at_least(0, "0 trains the backbone from the start; N trains the heads first"),
    "train.grad_accumulation_steps": at_least(1, "1 = no accumulation; k micro-batches of batch_size_per_gpu a step"),
    "train.drift_probe_images": at_least(0, "0 turns the drift monitor off; e.g. 64"),
    "train.drift_warning_drop": within(0, 1, "the fall of the CLS cosine that warns, e.g. 0.2", low_open=True),
    "train.drift_warning_window": at_least(1, "iterations after the backbone starts training, e.g. 20"),
    "optim.backbone_lr_mult": above(0, "the backbone's lr relative to optim.lr: 1.0 adapts, 0.1 stays near the start"),
    "optim.backbone_warmup_iterations": at_least(0, "iterations of the backbone's lr ramp, e.g. 100"),
    "student.layer_norm_eps": above(0, "1e-6 as Franca and DINOv2, 1e-5 for DINOv3"),
    "student.rope_base": above(0, "the RoPE period base, 100 as DINOv3"),
    "student.mlp_ratio": above(0, "the FFN width relative to embed_dim, 4 for every released Franca ViT"),
    "train.stop_at_iteration": at_least(0, "0 trains to the end; N stops after iteration N of the schedule"),
    "train.OFFICIAL_EPOCH_LENGTH": at_least(1, "set it to the iterations of one epoch of every schedule, e.g. 1250"),
    "train.use_block_masking": ValueRule(
        "true", _is_true, "false selects the legacy iBOT random masking, which franca does not implement"
    ),
    "train.health_entropy_threshold": within(0, 1, "set it to a fraction of log K, e.g. 0.97", low_open=True),
    "train.health_min_cls_spread": within(0, 1, "e.g. 0.05; 0 turns the collapse warning off", high_open=True),
    "train.health_patience": at_least(0, "set it to the logged iterations before a warning, e.g. 100"),
    "student.embed_dim": at_least(0, "0 takes the width of student.arch"),
    "student.depth": at_least(0, "0 takes the depth of student.arch"),
    "student.num_heads": at_least(0, "0 takes the heads of student.arch"),
    "student.patch_size": at_least(1, "Franca uses 14 (16 is DINOv2's default)"),
    "student.drop_path_rate": within(0, 1, "set it to the stochastic-depth rate, e.g. 0.1 to 0.4", high_open=True),
    "student.layerscale": at_least(0, "set it to the initial LayerScale gain, 1e-5 in Franca; 0 = no LayerScale"),
    "student.block_chunks": at_least(0, "0 keeps flat block keys; the released checkpoints use 4"),
    "student.num_register_tokens": at_least(0, "0 = no register tokens, as Franca"),
    "student.interpolate_offset": at_least(0, "0.1 as DINOv2"),
    "teacher.momentum_teacher": within(0, 1, "set it to the teacher EMA momentum at the start, e.g. 0.994"),
    "teacher.final_momentum_teacher": within(0, 1, "set it to the teacher EMA momentum at the end, usually 1.0"),
    "teacher.warmup_teacher_temp": above(0, "set it to the teacher temperature at the start, e.g. 0.04"),
    "teacher.teacher_temp": above(0, "set it to the teacher temperature after the warmup, e.g. 0.07"),
    "teacher.warmup_teacher_temp_epochs": at_least(0, "set it to the epochs of the temperature warmup, e.g. 30"),
    "optim.epochs": at_least(1, "the run lasts optim.epochs * train.OFFICIAL_EPOCH_LENGTH iterations"),
    "optim.weight_decay": at_least(0, "e.g. 0.04"),
    "optim.weight_decay_end": at_least(0, "e.g. 0.2"),
    "optim.base_lr": above(0, "set it to the learning rate per 1024 images, e.g. 0.004 (optim.lr is computed from it)"),
    "optim.lr": at_least(0, "it is computed from optim.base_lr; leave it at 0"),
    "optim.warmup_epochs": at_least(0, "set it to the epochs of the linear lr warmup, e.g. 10"),
    "optim.min_lr": at_least(0, "set it to the final learning rate of the cosine schedule, e.g. 1e-6"),
    "optim.clip_grad": at_least(0, "set it to the gradient-norm limit per submodule; 0 turns clipping off"),
    "optim.freeze_last_layer_epochs": at_least(0, "set it to the epochs the prototype layers stay frozen, e.g. 1"),
    "optim.patch_embed_lr_mult": at_least(0, "it multiplies the patch embedding's lr, e.g. 0.2"),
    "optim.layerwise_decay": within(0, 1, "1 = no decay, e.g. 0.9", low_open=True),
    "optim.adamw_beta1": within(0, 1, "e.g. 0.9", high_open=True),
    "optim.adamw_beta2": within(0, 1, "e.g. 0.999", high_open=True),
    "crops.global_crops_scale": fraction_pair("set it to the area share of a global crop, e.g. [0.32, 1.0]", True),
    "crops.local_crops_number": at_least(0, "0 = no local crops; Franca uses 8"),
    "crops.local_crops_scale": fraction_pair("set it to the area share of a local crop, e.g. [0.05, 0.32]", True),
    "crops.global_crops_size": at_least(1, "set it to the side of a global crop in pixels, e.g. 224"),
    "crops.local_crops_size": at_least(1, "set it to the side of a local crop in pixels, e.g. 96"),
    "evaluation.eval_period_iterations": at_least(0, "0 exports the teacher (and runs the k-NN) at the end only"),
    "evaluation.knn_k": every_entry(at_least(1, "each entry is a neighbour count, e.g. [10, 20, 100, 200]")),
    "evaluation.knn_temperature": above(0, "set it to the temperature of the k-NN vote, 0.07 as DINO"),
}


def _student_shape(cfg: DictConfig) -> tuple[int, int, int]:
    """(width, depth, heads) of the student: its overrides, else those of ``student.arch``."""
    student = cfg.student
    width, depth, heads = ARCHITECTURES[student.arch]
    return student.embed_dim or width, student.depth or depth, student.num_heads or heads


def _crops_fit_the_patch(cfg: DictConfig) -> list[str]:
    """The ViT cuts every crop into whole patches (franca/layers/patch_embed.py), and the iBOT masks cover the
    ``global_crops_size // patch_size`` grid (franca/train/train.py, build_collator)."""
    patch = cfg.student.patch_size
    crops = {"crops.global_crops_size": cfg.crops.global_crops_size}
    if cfg.crops.local_crops_number:
        crops["crops.local_crops_size"] = cfg.crops.local_crops_size
    problems = []
    for key, size in crops.items():
        if size % patch:
            below, over = size // patch * patch, (size // patch + 1) * patch
            example = f"{below} or {over}" if below else f"{over}"
            problems.append(
                f"{key}={size} is not a multiple of student.patch_size={patch}: the ViT cuts each crop into "
                f"{patch}x{patch} patches; set {key} to a multiple of {patch}, e.g. {example}"
            )
    return problems


def _width_splits_into_heads(cfg: DictConfig) -> list[str]:
    width, _, heads = _student_shape(cfg)
    if width % heads == 0:
        return []
    return [
        f"the student width {width} (student.embed_dim={cfg.student.embed_dim}, student.arch={cfg.student.arch}) is "
        f"not divisible by its {heads} attention heads (student.num_heads={cfg.student.num_heads}); set "
        f"student.embed_dim to a multiple of {heads} or student.num_heads to a divisor of {width}"
    ]


def _block_chunks_fit_the_depth(cfg: DictConfig) -> list[str]:
    _, depth, _ = _student_shape(cfg)
    if cfg.student.block_chunks <= depth:
        return []
    return [
        f"student.block_chunks={cfg.student.block_chunks} exceeds the student depth {depth} (student.depth="
        f"{cfg.student.depth}, student.arch={cfg.student.arch}); set it between 0 (flat keys) and {depth}"
    ]


def _koleo_has_neighbours(cfg: DictConfig) -> list[str]:
    if cfg.dino.koleo_loss_weight == 0 or cfg.train.batch_size_per_gpu >= 2:
        return []
    return [
        f"train.batch_size_per_gpu={cfg.train.batch_size_per_gpu} with dino.koleo_loss_weight="
        f"{cfg.dino.koleo_loss_weight}: KoLeo needs >= 2 images per process; raise train.batch_size_per_gpu or set "
        "dino.koleo_loss_weight=0"
    ]


def _matryoshka_levels(cfg: DictConfig) -> list[int]:
    """Feature sizes of the head levels: ``dino.nesting_list``, its default for the student width, or the whole width
    for the one-level DINOv2 head."""
    width = _student_shape(cfg)[0]
    if not cfg.dino.MRL:
        return [width]
    return list(cfg.dino.nesting_list) or default_nesting_list(width)


def _nesting_fits_the_heads(cfg: DictConfig) -> list[str]:
    """franca/layers/heads.py: level l reads the first d_l features of the CLS (d_l <= width, strictly increasing) and
    has int(K * d_l / width) prototypes, at least one."""
    nesting, width = list(cfg.dino.nesting_list), _student_shape(cfg)[0]
    if nesting and not cfg.dino.MRL:
        return [
            f"dino.nesting_list={nesting} is set but dino.MRL=false: the DINOv2 head has a single level; set "
            "dino.nesting_list=[] or dino.MRL=true"
        ]
    levels = _matryoshka_levels(cfg)
    named = f"dino.nesting_list={nesting}" if nesting else f"the default dino.nesting_list {levels}"
    if levels[0] < 1:
        return [f"{named} has an empty level for the student width {width}: give dino.nesting_list explicitly"]
    if any(a >= b for a, b in zip(levels[:-1], levels[1:])):
        return [f"{named} must be strictly increasing, e.g. [48, 96, 192, 384, 768]"]
    if levels[-1] > width:
        return [
            f"{named} has entries above the student width {width}: each level reads the first d features of the CLS "
            f"token; keep every entry <= {width}"
        ]
    heads = ["dino", "ibot"] if cfg.ibot.separate_head else ["dino"]
    return [
        f"{head}.head_n_prototypes={cfg[head].head_n_prototypes} leaves the first level of {named} without a "
        f"prototype (int(K * {levels[0]} / {width}) = 0); raise it to at least {math.ceil(width / levels[0])}"
        for head in heads
        if cfg[head].head_n_prototypes * levels[0] < width
    ]


def _level_weights_match_the_levels(cfg: DictConfig) -> list[str]:
    count = len(_matryoshka_levels(cfg))
    problems = []
    for key in ("dino.level_weights", "ibot.level_weights"):
        weights = list(OmegaConf.select(cfg, key))
        if weights and len(weights) != count:
            problems.append(
                f"{key}={weights} has {len(weights)} entries but the heads have {count} level(s) (dino.MRL="
                f"{cfg.dino.MRL}, dino.nesting_list={list(cfg.dino.nesting_list)}); give one weight per level, or [] "
                "for all 1"
            )
    return problems


def _freeze_within_the_run(cfg: DictConfig) -> list[str]:
    frozen, epochs = cfg.optim.freeze_last_layer_epochs, cfg.optim.epochs
    if frozen <= epochs:
        return []
    return [
        f"optim.freeze_last_layer_epochs={frozen} exceeds optim.epochs={epochs}: the prototype layers would never "
        "train; lower optim.freeze_last_layer_epochs"
    ]


def _knn_datasets_paired(cfg: DictConfig) -> list[str]:
    evaluation = cfg.evaluation
    train, val = evaluation.knn_train_dataset, evaluation.knn_val_dataset
    if bool(train) != bool(val):
        return [
            f"evaluation.knn_train_dataset={train!r} and evaluation.knn_val_dataset={val!r}: the periodic k-NN needs "
            "both (a labelled bank and a labelled validation set); set both, or both to '' to turn it off"
        ]
    if train and not evaluation.knn_k:
        return ["evaluation.knn_k=[] gives the periodic k-NN no neighbour count; set it, e.g. [10, 20, 100, 200]"]
    return []


def _stages_within_the_run(cfg: DictConfig) -> list[str]:
    total = cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH
    freeze, warmup = cfg.train.freeze_backbone_iterations, cfg.optim.backbone_warmup_iterations
    if freeze + warmup > total:
        return [
            f"train.freeze_backbone_iterations={freeze} + optim.backbone_warmup_iterations={warmup} exceed the run's "
            f"{total} iterations (optim.epochs x train.OFFICIAL_EPOCH_LENGTH); shorten the stages or lengthen the run"
        ]
    return []


def _frozen_backbone_is_pretrained(cfg: DictConfig) -> list[str]:
    freeze = cfg.train.freeze_backbone_iterations
    if not freeze or cfg.student.pretrained_weights or cfg.MODEL.WEIGHTS:
        return []
    return [
        f"train.freeze_backbone_iterations={freeze} trains the heads on a frozen backbone, but no weights start it "
        "(student.pretrained_weights is empty): the heads would learn from a random backbone. Set "
        "student.pretrained_weights=W (a hub name, a file, a folder or a URL), or train.freeze_backbone_iterations=0"
    ]


def _drift_warning_sees_a_log_line(cfg: DictConfig) -> list[str]:
    train = cfg.train
    if not cfg.student.pretrained_weights or not train.drift_probe_images:
        return []
    if train.drift_warning_window >= train.log_period:
        return []
    return [
        f"train.drift_warning_window={train.drift_warning_window} is shorter than train.log_period={train.log_period}: "
        "the drift is measured at log lines, so the warning might never be checked; raise "
        f"train.drift_warning_window to {train.log_period} or lower train.log_period"
    ]


def _initial_weights_consistent(cfg: DictConfig) -> list[str]:
    weights, pretrained = cfg.MODEL.WEIGHTS, cfg.student.pretrained_weights
    if cfg.train.high_resolution_finetune and not weights:
        return [
            "train.high_resolution_finetune=true needs MODEL.WEIGHTS (the training checkpoint to finetune); set it, "
            "or use student.pretrained_weights to start from a released backbone"
        ]
    if weights and pretrained:
        return [
            f"MODEL.WEIGHTS={weights!r} and student.pretrained_weights={pretrained!r} are both set; MODEL.WEIGHTS "
            "takes a whole training checkpoint, student.pretrained_weights a backbone: keep one"
        ]
    return []


# Constraints between keys: each returns the problems it finds in a config whose values obey VALUE_RULES. The
# warmup (optim.warmup_epochs <= optim.epochs) is checked once, by franca.train.schedules.build_schedules.
Constraint = Callable[[DictConfig], list[str]]
CONSTRAINTS: tuple[Constraint, ...] = (
    _crops_fit_the_patch,
    _width_splits_into_heads,
    _block_chunks_fit_the_depth,
    _koleo_has_neighbours,
    _nesting_fits_the_heads,
    _level_weights_match_the_levels,
    _freeze_within_the_run,
    _stages_within_the_run,
    _frozen_backbone_is_pretrained,
    _knn_datasets_paired,
    _drift_warning_sees_a_log_line,
    _initial_weights_consistent,
)


@dataclass(frozen=True)
class CommandConfig:
    """The config of a command that runs the trainer: its schema, value rules and constraints (the training config's
    :data:`TRAINING_CONFIG`; ``python -m franca.distill``'s ``franca.train.distill_config.DISTILL_CONFIG``)."""

    schema: ConfigSchema
    rules: dict[str, ValueRule]
    constraints: tuple[Constraint, ...]

    def load(self, config_file: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> DictConfig:
        """Defaults ← ``config_file`` ← ``overrides`` (``key=value`` strings), validated, struct mode."""
        cfg = self.schema.load(config_file, overrides)
        _check_parsed_values(cfg)
        self.validate(cfg)
        for key, reason in _IGNORED_WHEN_TRUE.items():
            if OmegaConf.select(cfg, key):
                warnings.warn(f"config key {key}=true is ignored: {reason}", UserWarning, stacklevel=2)
        return cfg

    def validate(self, cfg: DictConfig) -> None:
        """Raise :class:`ConfigError` listing every value of ``cfg`` outside its range (``rules``), or, when all are
        in range, every broken constraint between keys (``constraints``)."""
        problems = self._rule_problems(cfg) or [problem for check in self.constraints for problem in check(cfg)]
        if len(problems) == 1:
            raise ConfigError(problems[0])
        if problems:
            raise ConfigError(f"{len(problems)} config values are invalid:\n" + "\n".join(f"- {p}" for p in problems))

    def _rule_problems(self, cfg: DictConfig) -> list[str]:
        values = OmegaConf.to_container(cfg, resolve=True)
        problems = []
        for key in self.schema.fields:
            rule = next((rule for pattern, rule in self.rules.items() if fnmatchcase(key, pattern)), None)
            if rule is not None:
                problems += rule.problems(key, get_key(values, key))
        return problems


TRAINING_CONFIG = CommandConfig(TRAINING_SCHEMA, VALUE_RULES, CONSTRAINTS)


def validate_values(cfg: DictConfig) -> None:
    """:meth:`CommandConfig.validate` of the training config (:data:`VALUE_RULES`, :data:`CONSTRAINTS`)."""
    TRAINING_CONFIG.validate(cfg)


def load_config(config_file: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Training config: defaults ← ``config_file`` ← ``overrides`` (``key=value`` strings), validated, struct mode."""
    return TRAINING_CONFIG.load(config_file, overrides)


def apply_scaling_rules(cfg: DictConfig, world_size: int) -> DictConfig:
    """Set ``optim.lr`` from ``optim.base_lr`` (per 1024 images) and the global batch; returns cfg.

    The ``sqrt_wrt_1024`` rule of valeoai/Franca ``franca/utils/``, applied once at setup.

    ``sqrt_wrt_1024``: lr = base_lr · sqrt(global batch / 1024), global batch = batch_size_per_gpu · world_size ·
    ``train.grad_accumulation_steps``.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size={world_size!r} must be a positive integer (the number of training processes)")
    rule = cfg.optim.scaling_rule
    if rule != "sqrt_wrt_1024":
        raise ConfigError(f"optim.scaling_rule={rule!r} is not implemented; use optim.scaling_rule=sqrt_wrt_1024")
    global_batch = cfg.train.batch_size_per_gpu * world_size * cfg.train.grad_accumulation_steps
    lr = float(cfg.optim.base_lr * math.sqrt(global_batch / 1024.0))
    if cfg.optim.lr and not math.isclose(cfg.optim.lr, lr):
        warnings.warn(
            f"optim.lr={cfg.optim.lr} is replaced by {lr:.6g}: the learning rate is computed from optim.base_lr "
            f"({cfg.optim.base_lr}) and the global batch ({global_batch}) by {rule}; set optim.base_lr instead",
            UserWarning,
            stacklevel=2,
        )
    cfg.optim.lr = lr
    return cfg
