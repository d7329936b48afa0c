"""Config loading and validation (franca.train.config) and the shipped recipes, against the original configs and
training.md."""

import math
import os
import warnings
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from franca.layers.patch_embed import PatchEmbed
from franca.train.config import VALUE_RULES, apply_scaling_rules, load_config
from franca.utils.config_schema import ConfigError, save_config

REPO = Path(__file__).resolve().parents[1]
TRAIN_RECIPES = ["IN21K/vitb14", "IN21K/vitl14", "IN21K/vitg14", "LAION/vitl14", "LAION/vitg14"]
FINETUNE_RECIPES = ["vitb14_finetune", "vitl14_finetune"]
ALL_RECIPES = [REPO / "configs" / "train" / f"{name}.yaml" for name in TRAIN_RECIPES] + [
    REPO / "configs" / "finetune" / f"{name}.yaml" for name in FINETUNE_RECIPES
]


def _get(cfg, key):
    return OmegaConf.select(cfg, key, throw_on_missing=True)


# The original ssl_default_config.yaml, with our documented changes (saveckp_freq, cache_dataset, centering,
# separate_head) and the keys the original read but never defined.
ORIGINAL_DEFAULTS = {
    "MODEL.WEIGHTS": "",
    "compute_precision.grad_scaler": True,
    "dino.loss_weight": 1.0,
    "dino.head_n_prototypes": 65536,
    "dino.head_bottleneck_dim": 256,
    "dino.head_nlayers": 3,
    "dino.head_hidden_dim": 2048,
    "dino.koleo_loss_weight": 0.1,
    "dino.MRL": True,
    "ibot.loss_weight": 1.0,
    "ibot.mask_sample_probability": 0.5,
    "ibot.mask_ratio_min_max": [0.1, 0.65],
    "ibot.separate_head": True,
    "ibot.head_n_prototypes": 65536,
    "ibot.head_bottleneck_dim": 256,
    "ibot.head_nlayers": 3,
    "ibot.head_hidden_dim": 2048,
    "train.batch_size_per_gpu": 64,
    "train.dataset_path": "ImageNet:split=TRAIN",
    "train.output_dir": ".",
    "train.saveckp_freq": 1,
    "train.seed": 0,
    "train.num_workers": 10,
    "train.OFFICIAL_EPOCH_LENGTH": 1250,
    "train.cache_dataset": False,
    "train.centering": "sinkhorn_knopp",
    "train.use_block_masking": True,
    "train.use_inverse_block": True,
    "train.roll": True,
    "train.high_resolution_finetune": False,
    "student.arch": "vit_large",
    "student.patch_size": 16,
    "student.drop_path_rate": 0.3,
    "student.layerscale": 1e-5,
    "student.drop_path_uniform": True,
    "student.pretrained_weights": "",
    "student.ffn_layer": "mlp",
    "student.block_chunks": 0,
    "student.qkv_bias": True,
    "student.proj_bias": True,
    "student.ffn_bias": True,
    "student.num_register_tokens": 0,
    "student.interpolate_antialias": False,
    "student.interpolate_offset": 0.1,
    "teacher.momentum_teacher": 0.992,
    "teacher.final_momentum_teacher": 1.0,
    "teacher.warmup_teacher_temp": 0.04,
    "teacher.teacher_temp": 0.07,
    "teacher.warmup_teacher_temp_epochs": 30,
    "optim.epochs": 100,
    "optim.weight_decay": 0.04,
    "optim.weight_decay_end": 0.4,
    "optim.base_lr": 0.004,
    "optim.lr": 0.0,
    "optim.warmup_epochs": 10,
    "optim.min_lr": 1e-6,
    "optim.clip_grad": 3.0,
    "optim.freeze_last_layer_epochs": 1,
    "optim.scaling_rule": "sqrt_wrt_1024",
    "optim.patch_embed_lr_mult": 0.2,
    "optim.layerwise_decay": 0.9,
    "optim.adamw_beta1": 0.9,
    "optim.adamw_beta2": 0.999,
    "crops.global_crops_scale": [0.32, 1.0],
    "crops.local_crops_number": 8,
    "crops.local_crops_scale": [0.05, 0.32],
    "crops.global_crops_size": 224,
    "crops.local_crops_size": 96,
    "evaluation.eval_period_iterations": 12500,
}
NEW_DEFAULTS = {
    "dino.mrl_input": "slice",
    "dino.nesting_list": [],
    "dino.level_weights": [],
    "ibot.level_weights": [],
    "compute_precision.dtype": "auto",
    "crops.blur_quirk": True,
    "train.keep_checkpoints": 2,
    "train.log_period": 10,
    "evaluation.knn_train_dataset": "",
    "evaluation.knn_val_dataset": "",
    "evaluation.knn_k": [10, 20, 100, 200],
    "evaluation.knn_temperature": 0.07,
}


def test_default_config_has_every_reference_key_with_its_default():
    cfg = load_config()
    for key, expected in {**ORIGINAL_DEFAULTS, **NEW_DEFAULTS}.items():
        value = _get(cfg, key)
        assert value == expected, key
        assert type(value) is type(expected) or isinstance(expected, list), key


def test_default_precision_tree_keeps_the_original_structure_in_bf16():
    """The original's tree with bf16 instead of fp16 parameters (docs/deviations.md); reductions as original."""
    cfg = load_config()
    for model in ("teacher", "student"):
        for part in ("backbone", "dino_head", "ibot_head"):
            node = cfg.compute_precision[model][part]
            student_head = model == "student" and part != "backbone"
            assert node.sharding_strategy == "SHARD_GRAD_OP"
            assert node.mixed_precision.param_dtype == "bf16"
            assert node.mixed_precision.reduce_dtype == ("fp32" if student_head else "bf16")
            assert node.mixed_precision.buffer_dtype == "fp32"


# The original recipe files, with the documented fixes: 500 / 80 epochs everywhere, LAION-L base_lr 2e-4, MRL in vitg14.
COMMON_RECIPE = {
    "dino.head_n_prototypes": 131072,
    "dino.head_bottleneck_dim": 384,
    "dino.MRL": True,
    "ibot.separate_head": True,
    "ibot.head_n_prototypes": 131072,
    "ibot.head_bottleneck_dim": 256,
    "train.centering": "sinkhorn_knopp",
    "train.use_block_masking": True,
    "train.use_inverse_block": True,
    "train.roll": True,
    "train.high_resolution_finetune": False,
    "student.patch_size": 14,
    "student.ffn_layer": "swiglufused",
    "student.block_chunks": 4,
    "teacher.momentum_teacher": 0.994,
    "teacher.final_momentum_teacher": 1.0,
    "optim.weight_decay": 0.04,
    "optim.weight_decay_end": 0.2,
    "optim.layerwise_decay": 1.0,
    "crops.local_crops_size": 98,
    "crops.local_crops_number": 8,
}
PER_RECIPE = {
    "IN21K/vitb14": {"student.arch": "vit_base", "student.drop_path_rate": 0.1, "optim.base_lr": 7.01e-4},
    "IN21K/vitl14": {"student.arch": "vit_large", "student.drop_path_rate": 0.4, "optim.base_lr": 2.0e-4},
    "IN21K/vitg14": {"student.arch": "vit_giant2", "student.drop_path_rate": 0.4, "optim.base_lr": 2.0e-4},
    "LAION/vitl14": {
        "student.arch": "vit_large",
        "student.drop_path_rate": 0.4,
        "optim.base_lr": 2.0e-4,
        "crops.global_crops_scale": [0.48, 1.0],
        "crops.local_crops_scale": [0.05, 0.32],
    },
    "LAION/vitg14": {
        "student.arch": "vit_giant2",
        "student.drop_path_rate": 0.4,
        "optim.base_lr": 2.0e-4,
        "crops.global_crops_scale": [0.45, 1.0],
        "crops.local_crops_scale": [0.05, 0.45],
    },
    "vitb14_finetune": {
        "student.arch": "vit_base",
        "train.batch_size_per_gpu": 32,
        "optim.base_lr": 7.05e-5,
        "student.pretrained_weights": "franca_vitb14:IN21K_224",
    },
    "vitl14_finetune": {
        "student.arch": "vit_large",
        "train.batch_size_per_gpu": 16,
        "optim.base_lr": 1.51e-5,
        "student.pretrained_weights": "franca_vitl14:LAION_224",
    },
}
TRAIN_RECIPE = {
    "train.batch_size_per_gpu": 32,
    "train.OFFICIAL_EPOCH_LENGTH": 1250,
    "optim.epochs": 500,
    "optim.warmup_epochs": 80,
    "teacher.warmup_teacher_temp_epochs": 30,
    "crops.global_crops_size": 224,
    "student.pretrained_weights": "",
}
FINETUNE_RECIPE = {
    "train.OFFICIAL_EPOCH_LENGTH": 200,
    "train.saveckp_freq": 1,
    "optim.epochs": 100,
    "optim.warmup_epochs": 50,
    "teacher.warmup_teacher_temp_epochs": 30,
    "student.drop_path_rate": 0.1,
    "crops.global_crops_size": 518,
    "crops.global_crops_scale": [0.32, 1.0],
}


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: p.stem)
@pytest.mark.slow
def test_every_recipe_loads_with_the_reference_values(path):
    name = path.stem if path.parent.name == "finetune" else f"{path.parent.name}/{path.stem}"
    stage = FINETUNE_RECIPE if path.parent.name == "finetune" else TRAIN_RECIPE
    cfg = load_config(path)
    for key, expected in {**COMMON_RECIPE, **stage, **PER_RECIPE[name]}.items():
        assert _get(cfg, key) == expected, (name, key)
    assert "lustre" not in path.read_text() and "/path/to/" in cfg.train.dataset_path


@pytest.mark.parametrize("name", TRAIN_RECIPES)
def test_train_recipes_run_the_documented_625k_iterations_with_100k_warmup(name):
    cfg = load_config(REPO / "configs" / "train" / f"{name}.yaml")
    assert cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH == 625_000
    assert cfg.optim.warmup_epochs * cfg.train.OFFICIAL_EPOCH_LENGTH == 100_000


@pytest.mark.parametrize(
    ("name", "global_batch", "documented_lr"),
    [
        ("IN21K/vitb14", 2048, 1e-3),
        ("IN21K/vitl14", 3072, 3.5e-4),
        ("IN21K/vitg14", 3072, 3.5e-4),
        ("LAION/vitl14", 3072, 3.5e-4),
        ("LAION/vitg14", 3072, 3.5e-4),
    ],
)
def test_train_recipes_give_the_documented_lr_at_the_documented_batch(name, global_batch, documented_lr):
    cfg = load_config(REPO / "configs" / "train" / f"{name}.yaml")
    apply_scaling_rules(cfg, world_size=global_batch // cfg.train.batch_size_per_gpu)
    assert cfg.optim.lr == pytest.approx(documented_lr, rel=0.02)


def _write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_unknown_key_in_file_is_named_with_a_suggestion(tmp_path):
    path = _write(tmp_path, "optim:\n  base_lrr: 0.1\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "'optim.base_lrr'" in message and str(path) in message and "'optim.base_lr'" in message


@pytest.mark.parametrize(
    ("override", "named", "suggested"),
    [
        ("optim.base_lrr=1", "optim.base_lrr", "optim.base_lr"),
        ("optm.lr=1", "optm.lr", "optim.lr"),
        ("train.base_lr=1", "train.base_lr", "optim.base_lr"),
        ("evaluation.knn_temp=0.1", "evaluation.knn_temp", "evaluation.knn_temperature"),
    ],
)
def test_unknown_key_in_override_is_named_with_a_suggestion(override, named, suggested):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    message, _, suggestions = str(error.value).partition("did you mean ")
    assert f"'{named}'" in message and override in message and f"'{suggested}'" in suggestions


def test_closest_suggestion_comes_first():
    with pytest.raises(ConfigError, match=r"did you mean 'optim\.base_lr'"):
        load_config(None, ["optim.base_lrr=1"])


@pytest.mark.parametrize(
    ("override", "key", "shown_value", "expected"),
    [
        ("optim.epochs=abc", "optim.epochs", "'abc'", "an integer"),
        ("optim.epochs=2.5", "optim.epochs", "2.5", "an integer"),
        ("optim.base_lr=[1,2]", "optim.base_lr", "[1, 2]", "a number"),
        ("train.roll=1", "train.roll", "1", "a boolean"),
        ("train.roll=maybe", "train.roll", "'maybe'", "a boolean"),
        ("student.arch=[vit_base]", "student.arch", "['vit_base']", "one of"),
        ("crops.global_crops_scale=0.5", "crops.global_crops_scale", "0.5", "a list of 2 numbers"),
        ("crops.global_crops_scale=[0.1,0.5,1.0]", "crops.global_crops_scale", "[0.1, 0.5, 1.0]", "a list of 2"),
        ("crops.global_crops_scale=[0.1,a]", "crops.global_crops_scale[1]", "'a'", "a list of 2 numbers"),
        ("dino.nesting_list=[48,96.5]", "dino.nesting_list[1]", "96.5", "a list of integers"),
        ("evaluation.knn_k=[10,x]", "evaluation.knn_k[1]", "'x'", "a list of integers"),
        ("optim.lr=", "optim.lr", "None", "a number"),
        ("optim.lr=true", "optim.lr", "True", "a number"),
    ],
)
def test_wrong_type_names_key_value_and_expected_type(override, key, shown_value, expected):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    message = str(error.value)
    assert f"config key {key} has value {shown_value} " in message and expected in message


def test_wrong_type_in_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.warmup_epochs has value 'ten'"):
        load_config(_write(tmp_path, "optim:\n  warmup_epochs: ten\n"))


@pytest.mark.parametrize(
    ("key", "bad", "good"),
    [
        ("train.centering", "softmax", "centering"),
        ("dino.mrl_input", "slices", "project"),
        ("compute_precision.dtype", "float16", "fp16"),
        ("student.arch", "vit_huge", "vit_tiny"),
        ("student.ffn_layer", "geglu", "swiglu"),
        ("optim.scaling_rule", "linear_wrt_256", "sqrt_wrt_1024"),
        ("compute_precision.student.backbone.sharding_strategy", "SHARD_ALL", "FULL_SHARD"),
        ("compute_precision.teacher.ibot_head.mixed_precision.param_dtype", "fp8", "bf16"),
    ],
)
@pytest.mark.slow
def test_enumerated_keys_accept_only_their_choices(key, bad, good):
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"{key}={bad}"])
    assert key in str(error.value) and f"'{bad}'" in str(error.value) and f"'{good}'" in str(error.value)
    assert _get(load_config(None, [f"{key}={good}"]), key) == good


def test_student_arch_accepts_every_architecture():
    for arch in ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2"):
        assert load_config(None, [f"student.arch={arch}"]).student.arch == arch


def test_sections_and_values_cannot_replace_each_other(tmp_path):
    with pytest.raises(ConfigError, match=r"optim is a section"):
        load_config(None, ["optim=3"])
    with pytest.raises(ConfigError, match=r"config key optim\.lr expects a number"):
        load_config(_write(tmp_path, "optim:\n  lr:\n    value: 1\n"))


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope" / "vitb14.yaml"
    with pytest.raises(ConfigError, match="does not exist") as error:
        load_config(missing)
    assert str(missing) in str(error.value)


def test_invalid_yaml_and_non_mapping_files_are_named(tmp_path):
    broken = _write(tmp_path, "optim: [1, 2\n", "broken.yaml")
    with pytest.raises(ConfigError, match="not valid YAML") as error:
        load_config(broken)
    assert str(broken) in str(error.value)
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n", "list.yaml"))


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"], ids=["empty", "comment", "empty_mapping"])
def test_an_empty_config_file_is_an_error_not_the_default_recipe(tmp_path, text):
    empty = _write(tmp_path, text, "empty.yaml")
    with pytest.raises(ConfigError, match="is empty .*leave the file out") as error:
        load_config(empty)
    assert str(empty) in str(error.value)


def test_an_override_with_bytes_that_are_not_utf8_is_named_not_a_crash():
    path = os.fsdecode(b"/data/ph\xffotos")
    with pytest.raises(ConfigError, match=r"ph\\xffotos' holds bytes that are not UTF-8 .*symlink"):
        load_config(None, [f"train.dataset_path=ImageFolder:root={path}"])


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(ConfigError, match=r"'optim\.epochs' has no '='"):
        load_config(None, ["optim.epochs"])


def test_overrides_win_over_the_file_which_wins_over_defaults(tmp_path):
    path = _write(tmp_path, "optim:\n  epochs: 7\n  base_lr: 0.5\ntrain:\n  seed: 3\n")
    cfg = load_config(path, ["optim.epochs=9", "optim.base_lr=1", "train.dataset_path=ImageFolder:root=/d"])
    assert cfg.optim.epochs == 9 and cfg.train.seed == 3 and cfg.optim.warmup_epochs == 10
    assert cfg.optim.base_lr == 1.0 and isinstance(cfg.optim.base_lr, float)
    assert cfg.train.dataset_path == "ImageFolder:root=/d"


def test_empty_string_override_and_interpolation():
    cfg = load_config(None, ["student.pretrained_weights=", "optim.min_lr=${optim.base_lr}"])
    assert cfg.student.pretrained_weights == "" and cfg.optim.min_lr == 0.004
    with pytest.raises(ConfigError, match="optim.nope"):
        load_config(None, ["optim.min_lr=${optim.nope}"])


def test_loaded_config_rejects_new_keys_in_code():
    cfg = load_config()
    cfg.optim.lr = 0.5
    with pytest.raises(OmegaConfBaseException):
        cfg.optim.learning_rate = 0.5


def test_cache_dataset_true_warns_that_it_is_ignored():
    with pytest.warns(UserWarning, match="train.cache_dataset"):
        load_config(None, ["train.cache_dataset=true"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config()


@pytest.mark.parametrize(("batch", "world", "base_lr"), [(64, 1, 0.004), (64, 4, 0.004), (32, 64, 7.01e-4)])
def test_sqrt_scaling_rule(batch, world, base_lr):
    cfg = load_config(None, [f"train.batch_size_per_gpu={batch}", f"optim.base_lr={base_lr}"])
    assert apply_scaling_rules(cfg, world) is cfg
    assert cfg.optim.lr == pytest.approx(base_lr * math.sqrt(batch * world / 1024), rel=1e-12)


def test_scaling_rule_hand_values():
    cfg = apply_scaling_rules(load_config(), 4)  # 0.004 * sqrt(64 * 4 / 1024) = 0.004 / 2
    assert cfg.optim.lr == pytest.approx(0.002, rel=1e-12)
    cfg = apply_scaling_rules(load_config(None, ["train.batch_size_per_gpu=32"]), 128)  # sqrt(4096 / 1024) = 2
    assert cfg.optim.lr == pytest.approx(0.008, rel=1e-12)


def test_scaling_rule_errors():
    cfg = load_config()
    for world_size in (0, -1, 2.0):
        with pytest.raises(ConfigError, match="world_size"):
            apply_scaling_rules(cfg, world_size)
    cfg.optim.scaling_rule = "linear_wrt_256"
    with pytest.raises(ConfigError, match="linear_wrt_256"):
        apply_scaling_rules(cfg, 1)


def test_save_config_round_trips_atomically(tmp_path):
    cfg = load_config(ALL_RECIPES[0], ["optim.epochs=3"])
    target = tmp_path / "out" / "config.yaml"
    target.parent.mkdir()
    target.write_text("stale")
    assert save_config(cfg, target) == target
    assert sorted(p.name for p in target.parent.iterdir()) == ["config.yaml"]
    assert OmegaConf.to_container(load_config(target)) == OmegaConf.to_container(cfg)


def test_save_config_creates_the_folder(tmp_path):
    target = save_config(load_config(), tmp_path / "a" / "b" / "config.yaml")
    assert load_config(target).optim.base_lr == 0.004


def test_a_user_set_lr_is_replaced_with_a_warning():
    cfg = load_config(None, ["optim.lr=0.5", "optim.base_lr=0.004", "train.batch_size_per_gpu=64"])
    with pytest.warns(UserWarning, match=r"optim.lr=0.5 is replaced by 0.002.*set optim.base_lr instead"):
        apply_scaling_rules(cfg, world_size=4)
    assert cfg.optim.lr == pytest.approx(0.004 * (256 / 1024) ** 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_scaling_rules(cfg, world_size=4)  # a config saved by a run (lr already computed) stays silent


# One out-of-range value per rule of franca.train.config.VALUE_RULES: (override, the key the message must name).
OUT_OF_RANGE = [
    ("compute_precision.loss_chunk_size=0", "compute_precision.loss_chunk_size"),
    (
        "compute_precision.teacher.backbone.mixed_precision.buffer_dtype=bf16",
        "compute_precision.teacher.backbone.mixed_precision.buffer_dtype",
    ),
    ("dino.loss_weight=-1", "dino.loss_weight"),
    ("dino.head_n_prototypes=0", "dino.head_n_prototypes"),
    ("dino.head_bottleneck_dim=0", "dino.head_bottleneck_dim"),
    ("dino.head_nlayers=0", "dino.head_nlayers"),
    ("dino.head_hidden_dim=-1", "dino.head_hidden_dim"),
    ("dino.koleo_loss_weight=-0.1", "dino.koleo_loss_weight"),
    ("dino.nesting_list=[0,64]", "dino.nesting_list[0]"),
    ("dino.level_weights=[1,1,-1,1,1]", "dino.level_weights[2]"),
    ("ibot.loss_weight=-0.5", "ibot.loss_weight"),
    ("ibot.mask_sample_probability=1.5", "ibot.mask_sample_probability"),
    ("ibot.mask_ratio_min_max=[0.5,0.2]", "ibot.mask_ratio_min_max"),
    ("ibot.mask_ratio_min_max=[-0.1,0.5]", "ibot.mask_ratio_min_max"),
    ("ibot.head_n_prototypes=-3", "ibot.head_n_prototypes"),
    ("ibot.head_bottleneck_dim=0", "ibot.head_bottleneck_dim"),
    ("ibot.head_nlayers=0", "ibot.head_nlayers"),
    ("ibot.head_hidden_dim=0", "ibot.head_hidden_dim"),
    ("ibot.level_weights=[1,1,1,1,-2]", "ibot.level_weights[4]"),
    ("train.batch_size_per_gpu=-4", "train.batch_size_per_gpu"),
    ("train.dataset_path=", "train.dataset_path"),
    ("train.saveckp_freq=0", "train.saveckp_freq"),
    ("train.image_max_megapixels=0", "train.image_max_megapixels"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("train.log_period=0", "train.log_period"),
    ("train.stop_at_iteration=-1", "train.stop_at_iteration"),
    ("train.freeze_backbone_iterations=-1", "train.freeze_backbone_iterations"),
    ("train.grad_accumulation_steps=0", "train.grad_accumulation_steps"),
    ("train.drift_probe_images=-1", "train.drift_probe_images"),
    ("train.drift_warning_drop=0", "train.drift_warning_drop"),
    ("train.drift_warning_window=0", "train.drift_warning_window"),
    ("optim.backbone_lr_mult=0", "optim.backbone_lr_mult"),
    ("optim.backbone_warmup_iterations=-1", "optim.backbone_warmup_iterations"),
    ("student.mlp_ratio=0", "student.mlp_ratio"),
    ("student.layer_norm_eps=0", "student.layer_norm_eps"),
    ("student.rope_base=0", "student.rope_base"),
    ("train.seed=-1", "train.seed"),
    ("train.num_workers=-1", "train.num_workers"),
    ("train.OFFICIAL_EPOCH_LENGTH=0", "train.OFFICIAL_EPOCH_LENGTH"),
    ("train.use_block_masking=false", "train.use_block_masking"),
    ("train.health_entropy_threshold=0", "train.health_entropy_threshold"),
    ("train.health_entropy_threshold=97", "train.health_entropy_threshold"),
    ("train.health_min_cls_spread=1", "train.health_min_cls_spread"),
    ("train.health_patience=-5", "train.health_patience"),
    ("student.embed_dim=-8", "student.embed_dim"),
    ("student.depth=-1", "student.depth"),
    ("student.num_heads=-2", "student.num_heads"),
    ("student.patch_size=0", "student.patch_size"),
    ("student.drop_path_rate=1.0", "student.drop_path_rate"),
    ("student.layerscale=-1e-5", "student.layerscale"),
    ("student.block_chunks=-1", "student.block_chunks"),
    ("student.num_register_tokens=-4", "student.num_register_tokens"),
    ("student.interpolate_offset=-0.1", "student.interpolate_offset"),
    ("teacher.momentum_teacher=1.5", "teacher.momentum_teacher"),
    ("teacher.final_momentum_teacher=-0.1", "teacher.final_momentum_teacher"),
    ("teacher.warmup_teacher_temp=0", "teacher.warmup_teacher_temp"),
    ("teacher.teacher_temp=-0.07", "teacher.teacher_temp"),
    ("teacher.warmup_teacher_temp_epochs=-1", "teacher.warmup_teacher_temp_epochs"),
    ("optim.epochs=0", "optim.epochs"),
    ("optim.weight_decay=-0.04", "optim.weight_decay"),
    ("optim.weight_decay_end=-1", "optim.weight_decay_end"),
    ("optim.base_lr=-1", "optim.base_lr"),
    ("optim.base_lr=0", "optim.base_lr"),
    ("optim.lr=-0.1", "optim.lr"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs"),
    ("optim.min_lr=-1e-6", "optim.min_lr"),
    ("optim.clip_grad=-3", "optim.clip_grad"),
    ("optim.freeze_last_layer_epochs=-1", "optim.freeze_last_layer_epochs"),
    ("optim.patch_embed_lr_mult=-0.2", "optim.patch_embed_lr_mult"),
    ("optim.layerwise_decay=0", "optim.layerwise_decay"),
    ("optim.layerwise_decay=1.1", "optim.layerwise_decay"),
    ("optim.adamw_beta1=1", "optim.adamw_beta1"),
    ("optim.adamw_beta2=-0.1", "optim.adamw_beta2"),
    ("crops.global_crops_scale=[0,1]", "crops.global_crops_scale"),
    ("crops.global_crops_scale=[0.5,0.3]", "crops.global_crops_scale"),
    ("crops.local_crops_number=-1", "crops.local_crops_number"),
    ("crops.local_crops_scale=[0.05,1.5]", "crops.local_crops_scale"),
    ("crops.global_crops_size=0", "crops.global_crops_size"),
    ("crops.local_crops_size=-96", "crops.local_crops_size"),
    ("evaluation.eval_period_iterations=-1", "evaluation.eval_period_iterations"),
    ("evaluation.knn_k=[10,0]", "evaluation.knn_k[1]"),
    ("evaluation.knn_temperature=0", "evaluation.knn_temperature"),
]


def _read_yaml(text: str):
    return OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]))["value"]


def _expected_value(override: str, key: str):
    """The value an override gives ``key`` (an entry of the list for ``key[i]``), as the config's YAML reads it."""
    value = _read_yaml(override.partition("=")[2])
    index = key.partition("[")[2].rstrip("]")
    return value[int(index)] if index else ("" if value is None else value)


@pytest.mark.parametrize(("override", "key"), OUT_OF_RANGE, ids=[case[0] for case in OUT_OF_RANGE])
@pytest.mark.slow
def test_out_of_range_value_names_key_value_rule_and_fix(override, key):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    message = str(error.value)
    shown, rule_and_fix = message.removeprefix(f"{key}=").split(" must be ", 1)
    assert message.startswith(f"{key}="), message
    assert _read_yaml(shown) == _expected_value(override, key), message
    assert "; " in rule_and_fix, message


def test_every_value_rule_has_a_bad_value_case_and_matches_a_key():
    fields = load_config()
    tested = {key.partition("[")[0] for _, key in OUT_OF_RANGE}
    for pattern in VALUE_RULES:
        assert any(fnmatchcase(key, pattern) for key in tested), f"no out-of-range case for {pattern}"
        assert any(fnmatchcase(key, pattern) for key in _leaf_keys(fields)), f"{pattern} matches no key"


def _leaf_keys(cfg, prefix=""):
    for name, value in cfg.items():
        if OmegaConf.is_dict(value):
            yield from _leaf_keys(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


@pytest.mark.parametrize(
    "overrides",
    [
        ["ibot.mask_ratio_min_max=[0,1]", "ibot.mask_sample_probability=0"],
        ["crops.global_crops_scale=[1,1]", "crops.local_crops_scale=[0.01,0.01]"],
        ["optim.clip_grad=0", "optim.layerwise_decay=1", "optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=100"],
        ["teacher.momentum_teacher=0", "teacher.final_momentum_teacher=1", "student.layerscale=0"],
        ["crops.local_crops_number=0", "crops.local_crops_size=7"],  # no local crops: their size is unused
        ["train.batch_size_per_gpu=1", "dino.koleo_loss_weight=0", "train.num_workers=0", "train.seed=0"],
        ["evaluation.eval_period_iterations=0", "evaluation.knn_k=[1]", "train.health_min_cls_spread=0"],
        ["dino.nesting_list=[64,1024]", "dino.level_weights=[1,2]", "ibot.level_weights=[0,1]"],
        ["dino.MRL=false", "dino.level_weights=[0.5]"],
        ["evaluation.knn_train_dataset=ImageFolder:root=/a", "evaluation.knn_val_dataset=ImageFolder:root=/b"],
    ],
)
def test_values_at_the_edges_of_their_ranges_load(overrides):
    load_config(None, overrides)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (
            ["crops.global_crops_size=30", "student.patch_size=4"],
            ["crops.global_crops_size=30", "student.patch_size=4"],
        ),
        (["crops.global_crops_size=8", "student.patch_size=14"], ["crops.global_crops_size=8", "e.g. 14"]),
        (["crops.local_crops_size=100"], ["crops.local_crops_size=100", "student.patch_size=16", "96 or 112"]),
        (["student.embed_dim=100"], ["student.embed_dim=100", "student.num_heads=0", "16 attention heads"]),
        (["student.arch=vit_base", "student.num_heads=5"], ["student.num_heads=5", "width 768"]),
        (["student.depth=4", "student.block_chunks=5"], ["student.block_chunks=5", "depth 4"]),
        (["train.batch_size_per_gpu=1"], ["train.batch_size_per_gpu=1", "dino.koleo_loss_weight=0.1"]),
        (["dino.MRL=false", "dino.nesting_list=[8,16]"], ["dino.nesting_list=[8, 16]", "dino.MRL=false"]),
        (["dino.nesting_list=[64,32]"], ["dino.nesting_list=[64, 32]", "strictly increasing"]),
        (["dino.nesting_list=[64,2048]"], ["dino.nesting_list=[64, 2048]", "width 1024"]),
        (["student.arch=vit_tiny", "student.embed_dim=8", "student.num_heads=2"], ["dino.nesting_list", "width 8"]),
        (["dino.head_n_prototypes=10"], ["dino.head_n_prototypes=10", "at least 16"]),
        (["ibot.head_n_prototypes=15"], ["ibot.head_n_prototypes=15", "at least 16"]),
        (["dino.level_weights=[1,1]"], ["dino.level_weights=[1.0, 1.0]", "5 level(s)"]),
        (["dino.nesting_list=[64,128]", "ibot.level_weights=[1,1,1]"], ["ibot.level_weights", "2 level(s)"]),
        (["dino.MRL=false", "dino.level_weights=[1,1]"], ["dino.level_weights", "1 level(s)", "dino.MRL=False"]),
        (["optim.freeze_last_layer_epochs=101"], ["optim.freeze_last_layer_epochs=101", "optim.epochs=100"]),
        (
            [
                "optim.epochs=1",
                "train.OFFICIAL_EPOCH_LENGTH=10",
                "train.freeze_backbone_iterations=6",
                "optim.backbone_warmup_iterations=5",
            ],
            ["train.freeze_backbone_iterations=6", "optim.backbone_warmup_iterations=5", "10 iterations"],
        ),
        (
            ["train.freeze_backbone_iterations=5"],
            ["train.freeze_backbone_iterations=5", "student.pretrained_weights is empty"],
        ),
        (
            ["student.pretrained_weights=w.pth", "train.log_period=50"],
            ["train.drift_warning_window=20", "train.log_period=50", "to 50"],
        ),
        (["evaluation.knn_train_dataset=ImageFolder:root=/a"], ["evaluation.knn_train_dataset", "knn_val_dataset=''"]),
        (["evaluation.knn_val_dataset=ImageFolder:root=/b"], ["evaluation.knn_train_dataset=''", "knn_val_dataset"]),
        (
            [
                "evaluation.knn_train_dataset=ImageFolder:root=/a",
                "evaluation.knn_val_dataset=X:root=/b",
                "evaluation.knn_k=[]",
            ],
            ["evaluation.knn_k=[]"],
        ),
    ],
)
@pytest.mark.slow
def test_broken_constraint_between_keys_names_them(overrides, named):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert all(part in str(error.value) for part in named), str(error.value)


def test_the_ibot_prototypes_do_not_matter_without_a_separate_ibot_head():
    load_config(None, ["ibot.separate_head=false", "ibot.head_n_prototypes=15"])


@pytest.mark.slow
def test_crop_rule_accepts_exactly_the_sizes_the_patch_embedding_accepts():
    embed = PatchEmbed(patch_size=4, embed_dim=8)
    for size in range(1, 30):
        try:
            embed(torch.zeros(1, 3, size, size))
            model_accepts = True
        except ValueError:
            model_accepts = False
        try:
            load_config(None, [f"crops.global_crops_size={size}", "student.patch_size=4"])
            config_accepts = True
        except ConfigError:
            config_accepts = False
        assert config_accepts == model_accepts, size


def test_every_problem_is_listed_in_one_error():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["train.batch_size_per_gpu=0", "optim.epochs=0", "teacher.teacher_temp=0"])
    message = str(error.value)
    assert message.startswith("3 config values are invalid")
    assert all(key in message for key in ("train.batch_size_per_gpu=0", "optim.epochs=0", "teacher.teacher_temp=0.0"))


def test_values_from_a_file_are_checked_too(tmp_path):
    with pytest.raises(ConfigError, match=r"^train\.num_workers=-2 must be >= 0"):
        load_config(_write(tmp_path, "train:\n  num_workers: -2\n"))
    with pytest.raises(ConfigError, match=r"^train\.num_workers=-1 must be >= 0"):
        load_config(_write(tmp_path, "train:\n  num_workers: 4\n"), ["train.num_workers=-1"])


# Keys a recipe leaves to the user and checks for (configs/train/adapt.yaml: the weights to adapt).
RECIPE_USER_KEYS = {"adapt": ["student.pretrained_weights=w.pth"]}


@pytest.mark.parametrize(
    "path",
    sorted((REPO / "configs" / "train").rglob("*.yaml")) + sorted((REPO / "configs" / "finetune").glob("*.yaml")),
    ids=lambda p: f"{p.parent.name}/{p.stem}",
)
def test_every_shipped_training_recipe_passes_the_value_rules(path):
    load_config(path, RECIPE_USER_KEYS.get(path.stem, []))


def test_the_adapt_recipe_asks_for_the_weights_it_adapts():
    with pytest.raises(ConfigError, match="student.pretrained_weights is empty"):
        load_config(REPO / "configs" / "train" / "adapt.yaml")


def test_the_drift_window_rule_needs_a_drift_monitor():
    load_config(None, ["train.log_period=50"])  # no pretrained weights: no monitor
    load_config(None, ["student.pretrained_weights=w.pth", "train.log_period=50", "train.drift_probe_images=0"])
    load_config(None, ["student.pretrained_weights=w.pth", "train.log_period=20"])
