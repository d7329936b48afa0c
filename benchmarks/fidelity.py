"""Fidelity on real data: Franca vs the DINOv2 baseline, pretrained side by side on Fashion-MNIST.

``python benchmarks/fidelity.py --budget cpu|gpu [--out DIR] [--seed S] [--data-root R] [--set KEY=VALUE ...]``

Both models are pretrained by ``franca.train`` with the same backbone, resolution, data, budget and seed: Franca
(nested Matryoshka heads, CyclicMask) and the DINOv2 baseline (one-level DINOHead, plain block masking without the
circular shift; ``baseline`` in configs/fidelity/). Their teachers are then judged on the Fashion-MNIST test split
(70,000 real 28×28 photos of clothing, Debian's ``dataset-fashion-mnist``):

- weighted k-NN (k = 20 headline, and the k grid) and a linear probe (logistic regression, C chosen on a 10% holdout
  of the training features, :mod:`franca.eval.log_regression`) on the full CLS feature;
- Matryoshka slices: k-NN on the first D, D/2, …, D/64 features of both models (the paper's Figure 4 on our data);
- RASA on the Franca teacher (``rasa.train`` on Fashion-MNIST crops at the global-crop resolution): the position R²
  of a fresh linear read-out of the patch tokens before and after the removal, and k-NN on the *mean patch token*
  before and after (RASA leaves the CLS token unchanged by construction, so CLS k-NN cannot move);
- two floors: raw pixels, and the same ViT at random initialisation.

Architecture for 28 px photos: patch 4 gives a 7×7 token grid on the 28 px global crops and a 3×3 grid on 12 px local
crops (a third of the side, like DINOv2's 96/224). Upsampling to 56 px with patch 8 would give the same 7×7 grid from
interpolated pixels at the same attention cost and 4× the pixels to augment; patch 2 (14×14) would cost ~4× the
compute per image. So the CPU budget uses a ViT 128-d/depth 4, the GPU budget a ViT-S (384-d, depth 12, 6 heads),
both patch 4 at 28 px; local crops 12 px, matching ``configs/train/quickstart.yaml``.

Budgets live in ``configs/fidelity/{cpu,gpu}.yaml`` (the pretraining recipe, the baseline overrides, the datasets and
the evaluation and RASA settings); ``--set section.key=value`` changes one (e.g. ``--set pretrain.optim.epochs=20``).
``--data-root R`` reads the Fashion-MNIST idx files from R for every dataset string without a ``root``. Rerunning
the same command resumes the trainings and RASA rounds; ``--fresh`` starts over. Outputs in ``--out``:
``fidelity.json`` (every number, the command, device, versions, seed, timings), ``fidelity.md`` (the tables),
``matryoshka_fidelity.png``, ``loss_curves.png`` (both runs), and the runs themselves (``franca/``, ``dinov2/``,
``rasa/``).
"""

import argparse
import copy
import importlib.util
import io
import shlex
import sys
import time
from pathlib import Path

import torch
from common import environment, write_json_atomic
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Subset

from franca.checkpoint import teacher_export_path
from franca.data.augmentations import make_classification_eval_transform
from franca.data.loaders import make_dataset, parse_dataset_string
from franca.data.seeded_transform import seeded_global_rngs
from franca.eval.lib.logreg_backends import make_backend
from franca.eval.lib.logreg_search import c_grid, log_regression_eval
from franca.eval.lib.models import FeatureModel
from franca.eval.matryoshka import matryoshka_dims, matryoshka_knn
from franca.hub import load_backbone, load_rasa_head
from franca.train import train as trainer
from franca.train.config import apply_scaling_rules, load_config
from franca.train.health import level_values
from franca.train.ssl_meta_arch import build_backbone
from franca.utils.atomic import atomic_write
from franca.utils.features import default_device, extract_features
from franca.utils.knn import knn_accuracies
from franca.utils.logging import read_metrics
from rasa import train as rasa_train
from rasa.config import REGRESSOR_CHOICES, load_rasa_config
from rasa.data import make_rasa_eval_transform, make_rasa_train_transform
from rasa.eval import evaluate_removal, extract_patch_tokens, split_images

REPO = Path(__file__).resolve().parents[1]
BUDGET_DIR = REPO / "configs" / "fidelity"
SECTIONS = ("pretrain", "baseline", "datasets", "evaluation", "rasa", "rasa_eval")
FULL_SPLIT_SIZES = {"train": 60000, "test": 10000}
FRANCA, DINOV2, PIXELS = "Franca", "DINOv2 baseline", "raw pixels"
# At initialisation LayerScale (1e-5) mutes every block, so the CLS output is the same for all images (chance-level
# k-NN); the mean patch token of the random ViT is the informative floor, both are reported.
RANDOM, RANDOM_PATCH = "random-init ViT (CLS)", "random-init ViT (mean patch)"
LOSS_TERMS = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss")


class FidelitySetupError(RuntimeError):
    pass


def load_budget(name: str, assignments: list[str]) -> DictConfig:
    """``configs/fidelity/<name>.yaml`` with ``--set`` assignments merged (unknown keys are refused)."""
    path = BUDGET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FidelitySetupError(f"budget file {path} not found; --budget takes one of cpu, gpu")
    budget = OmegaConf.load(path)
    missing = [s for s in SECTIONS if s not in budget]
    if missing:
        raise FidelitySetupError(f"{path} lacks the section(s) {missing}; every budget has {list(SECTIONS)}")
    OmegaConf.set_struct(budget, True)
    for item in assignments:
        key, sep, _ = item.partition("=")
        if not sep or OmegaConf.select(budget, key, default=KeyError) is KeyError:
            raise FidelitySetupError(
                f"--set {item!r}: {key!r} is not a key of {path.name}; write section.key=value with an existing key, "
                "e.g. --set pretrain.optim.epochs=20"
            )
        budget.merge_with(OmegaConf.from_dotlist([item]))
    return budget


def with_root(dataset_str: str, root: str | None) -> str:
    """The dataset string with ``root=R`` added when it names none (``--data-root``)."""
    if root is None or "root" in parse_dataset_string(dataset_str)[1]:
        return dataset_str
    return f"{dataset_str}:root={root}"


class GrayPixels(nn.Module):
    """The raw-pixel floor: the first channel of the normalised image, flattened (Fashion-MNIST is grayscale)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0].flatten(1)


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    def stage(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                print(f"\n=== {name} ===", flush=True)
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = round(time.perf_counter() - self.start, 1)

        return _Stage()


class Runner:
    """One fidelity run: checks, two pretrainings, features, evaluations, RASA, outputs."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.budget = load_budget(args.budget, args.set)
        self.out = Path(args.out or REPO / "runs" / f"fidelity_{args.budget}")
        self.seed = args.seed
        self.datasets = {k: with_root(v, args.data_root) for k, v in self.budget.datasets.items()}
        self.device = default_device()
        self.timer = Timer()
        self.recipe = self.out / "recipes" / "pretrain.yaml"
        self.overrides = {
            FRANCA: [f"train.dataset_path={self.datasets['pretrain']}", f"train.seed={self.seed}"],
            DINOV2: [
                f"train.dataset_path={self.datasets['pretrain']}",
                f"train.seed={self.seed}",
                *self.budget.baseline,
            ],
        }
        self.run_dirs = {FRANCA: self.out / "franca", DINOV2: self.out / "dinov2"}

    # ---------------------------------------------------------------- checks (fail before any training)
    def check_setup(self) -> None:
        if self.args.budget == "gpu" and not torch.cuda.is_available():
            raise FidelitySetupError(
                "--budget gpu needs a CUDA GPU (bf16 autocast, its batch and schedule); torch sees none here. "
                "Run --budget cpu on a CPU machine"
            )
        for module, extra in (("matplotlib", "matplotlib"), ("sklearn", "scikit-learn")):
            needed = module == "matplotlib" or self.budget.evaluation.linear_backend == "sklearn"
            if needed and importlib.util.find_spec(module) is None:
                raise FidelitySetupError(f"the fidelity benchmark needs {module}: pip install {extra}")
        if self.budget.evaluation.matryoshka_halvings < 4:
            raise FidelitySetupError(
                f"evaluation.matryoshka_halvings={self.budget.evaluation.matryoshka_halvings}: the D/16 goal needs at "
                "least 4 halvings (the budgets use 6: D … D/64)"
            )
        for key in ("pretrain", "train", "test"):
            split = "test" if key == "test" else "train"
            size = len(make_dataset(self.datasets[key]))
            if size != FULL_SPLIT_SIZES[split]:
                raise FidelitySetupError(
                    f"datasets.{key}={self.datasets[key]!r} has {size} images, not the full Fashion-MNIST {split} "
                    f"split ({FULL_SPLIT_SIZES[split]}): install Debian's dataset-fashion-mnist "
                    "(apt-get install dataset-fashion-mnist) or pass --data-root DIR holding the four idx files"
                )
        self.recipe.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.budget.pretrain, self.recipe)
        self.train_cfgs = {name: load_config(self.recipe, overrides) for name, overrides in self.overrides.items()}
        regressors = self.budget.rasa_eval.regressors
        if not (
            OmegaConf.is_dict(regressors)
            and regressors
            and set(regressors) <= set(REGRESSOR_CHOICES)
            and all(OmegaConf.is_list(overrides) for overrides in regressors.values())
        ):
            raise FidelitySetupError(
                f"rasa_eval.regressors={regressors!r} must map regressors from {REGRESSOR_CHOICES} to lists of "
                "rasa.train overrides, the first judged by the goals, e.g. {cross_covariance: [train.end_round=1], "
                "trained: []}"
            )
        self.rasa_cfgs = {
            regressor: load_rasa_config(None, [*self._rasa_overrides(), f"train.regressor={regressor}", *overrides])
            for regressor, overrides in regressors.items()
        }

    def _rasa_overrides(self) -> list[str]:
        flat = OmegaConf.to_container(self.budget.rasa)
        items = [f"{section}.{key}={value}" for section, values in flat.items() for key, value in values.items()]
        return items + [
            f"model.weights={self.teacher_file(FRANCA)}",
            f"data.dataset={self.datasets['rasa']}",
            f"train.seed={self.seed}",
            "val.dataset=",
        ]

    def teacher_file(self, name: str) -> Path:
        cfg = load_config(self.recipe, self.overrides[name])
        apply_scaling_rules(cfg, world_size=1)
        return teacher_export_path(self.run_dirs[name], cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH)

    # ---------------------------------------------------------------- stages
    def pretrain(self, name: str) -> Path:
        argv = ["--config-file", str(self.recipe), "--output-dir", str(self.run_dirs[name]), *self.overrides[name]]
        trainer.main(argv + (["--no-resume"] if self.args.fresh else []))
        return self.teacher_file(name)

    def eval_sets(self) -> tuple:
        size = self.budget.pretrain.crops.global_crops_size
        transform = make_classification_eval_transform(resize_size=size, crop_size=size)
        sets = []
        for key, count in (
            ("train", self.budget.evaluation.train_samples),
            ("test", self.budget.evaluation.test_samples),
        ):
            dataset = make_dataset(self.datasets[key], transform=transform)
            sets.append(Subset(dataset, range(min(count, len(dataset)))) if count else dataset)
        return tuple(sets)

    def features(self, model: nn.Module, name: str) -> tuple[torch.Tensor, ...]:
        ev = self.budget.evaluation
        train_x, train_y = extract_features(
            model, self.train_set, ev.batch_size, ev.num_workers, self.device, name=f"{name} train"
        )
        test_x, test_y = extract_features(
            model, self.test_set, ev.batch_size, ev.num_workers, self.device, name=f"{name} test"
        )
        return train_x, train_y, test_x, test_y

    def knn(self, feats: tuple) -> dict:
        ev = self.budget.evaluation
        return knn_accuracies(*feats, ks=tuple(sorted({*ev.ks, ev.k})), temperature=ev.temperature)

    def linear(self, feats: tuple, name: str) -> dict:
        ev = self.budget.evaluation
        backend = make_backend(ev.linear_backend, max_iter=ev.linear_max_iter)
        c_values = c_grid(ev.linear_c_grid_size, *ev.linear_c_log10_range)
        result = log_regression_eval(*feats, c_values, backend, seed=self.seed, name=f"linear probe {name}")
        return {"backend": backend.name, **result}

    def rasa(self, franca_teacher: Path) -> dict:
        """For each of ``rasa_eval.regressors``: train a RASA head on the Franca teacher, then measure the position R²
        and the mean-patch k-NN before and after its removal; ``{regressor: results}``."""
        backbone = load_backbone(franca_teacher).to(self.device).eval()
        before = self.knn(self.features(FeatureModel(backbone, readout="mean_patch"), "mean patch token"))
        data = next(iter(self.rasa_cfgs.values())).data  # the budget's crops, the same for every regressor
        plain = self.position_tokens(backbone, make_rasa_eval_transform(data.image_size), "plain test images")
        augmented = self.position_tokens(
            backbone, make_rasa_train_transform(data.image_size, (data.min_scale, data.max_scale)), "augmented crops"
        )
        fit, held_out = split_images(len(plain), 0.5, self.seed)
        results = {}
        for regressor, cfg in self.rasa_cfgs.items():
            head_file = rasa_train.train(cfg, self.out / "rasa" / regressor, resume=not self.args.fresh)
            head = load_rasa_head(head_file, embed_dim=backbone.embed_dim)
            stages, _ = evaluate_removal(head, plain, None, fit, held_out, with_miou=False)
            augmented_stages, _ = evaluate_removal(head, augmented, None, fit, held_out, with_miou=False)
            backbone.attach_rasa_head(copy.deepcopy(head).to(self.device))
            debiased = FeatureModel(backbone, use_rasa_head=True)
            after = self.knn(self.features(debiased, f"mean RASA patch token ({regressor})"))
            results[regressor] = {
                "head": str(head_file),
                "planes_removed": len(stages) - 1,
                "position_images": len(plain),
                "position_r2_before": stages[0]["position_r2"],
                "position_r2_after": stages[-1]["position_r2"],
                "augmented_position_r2_before": augmented_stages[0]["position_r2"],
                "augmented_position_r2_after": augmented_stages[-1]["position_r2"],
                "stages": stages,
                "knn_mean_patch_before": before,
                "knn_mean_patch_after": after,
            }
        return results

    def position_tokens(self, backbone: nn.Module, transform, name: str) -> torch.Tensor:
        """Patch tokens of the first ``rasa_eval.position_images`` test images under ``transform`` (random
        augmentations drawn from ``--seed``)."""
        ev = self.budget.evaluation
        dataset = make_dataset(self.datasets["test"], transform=transform)
        dataset = Subset(dataset, range(min(self.budget.rasa_eval.position_images, len(dataset))))
        with seeded_global_rngs([self.seed, 1]):
            tokens, _, _ = extract_patch_tokens(
                backbone, dataset, ev.batch_size, ev.num_workers, self.device, name=f"patch tokens of {name}"
            )
        return tokens

    # ---------------------------------------------------------------- the whole run
    def run(self) -> dict:
        started = time.perf_counter()
        with self.timer.stage("checks"):
            self.check_setup()
        teachers = {}
        for name in (FRANCA, DINOV2):
            with self.timer.stage(f"pretrain {name}"):
                teachers[name] = self.pretrain(name)
        self.train_set, self.test_set = self.eval_sets()
        torch.manual_seed(self.seed)
        random_vit = build_backbone(self.train_cfgs[FRANCA], drop_path=False)
        models = {
            PIXELS: GrayPixels(),
            RANDOM: random_vit,
            RANDOM_PATCH: FeatureModel(random_vit, readout="mean_patch"),
            FRANCA: load_backbone(teachers[FRANCA]),
            DINOV2: load_backbone(teachers[DINOV2]),
        }
        feats, knn, linear = {}, {}, {}
        for name, model in models.items():
            with self.timer.stage(f"evaluate {name}"):
                feats[name] = self.features(model, name)
                knn[name] = self.knn(feats[name])
                if name in (FRANCA, DINOV2) or self.budget.evaluation.linear_probe_floors:
                    linear[name] = self.linear(feats[name], name)
        with self.timer.stage("Matryoshka slices"):
            dims = matryoshka_dims(feats[FRANCA][0].shape[1], self.budget.evaluation.matryoshka_halvings)
            slices = {
                name: {
                    d: r[str(self.budget.evaluation.k)]["top1"]
                    for d, r in matryoshka_knn(*feats[name], dims, (self.budget.evaluation.k,)).items()
                }
                for name in (FRANCA, DINOV2)
            }
        with self.timer.stage("RASA"):
            rasa = self.rasa(teachers[FRANCA])
        self.timer.seconds["total"] = round(time.perf_counter() - started, 1)
        return self.record(teachers, knn, linear, slices, rasa)

    def final_target_entropies(self) -> dict:
        """Per model and head, each level's last logged teacher-target entropy / log K (franca.train.health)."""
        result = {}
        for name, run_dir in self.run_dirs.items():
            last = read_metrics(run_dir / "training_metrics.json")[-1]
            result[name] = {head: level_values(last, head, "target_entropy") for head in ("dino", "ibot")}
        return result

    def record(self, teachers: dict, knn: dict, linear: dict, slices: dict, rasa: dict) -> dict:
        k = str(self.budget.evaluation.k)
        dim = max(slices[FRANCA])
        result = {
            "budget": self.args.budget,
            "seed": self.seed,
            "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
            "environment": environment(self.device),
            "timings_s": self.timer.seconds,
            "datasets": self.datasets,
            "train_images": len(self.train_set),
            "test_images": len(self.test_set),
            "teachers": {name: str(path) for name, path in teachers.items()},
            "budget_config": OmegaConf.to_container(self.budget),
            "k": int(k),
            "knn": knn,
            "linear": {name: {key: v for key, v in r.items() if key != "holdout_top1"} for name, r in linear.items()},
            "matryoshka": {
                "dims": sorted(slices[FRANCA], reverse=True),
                "top1": {name: {str(d): acc for d, acc in s.items()} for name, s in slices.items()},
                "retention_d16": {name: s[dim >> 4] / s[dim] for name, s in slices.items()},
            },
            "target_entropy": self.final_target_entropies(),
            "rasa": {"regressor": next(iter(rasa)), **next(iter(rasa.values()))},
            "rasa_regressors": rasa,
        }
        result["goals"] = goals(result)
        return result


def goals(result: dict) -> list[dict]:
    """The issue's targets, each with the measured value and whether it is met."""
    k = str(result["k"])
    top1 = {name: r[k]["top1"] for name, r in result["knn"].items()}
    retention = result["matryoshka"]["retention_d16"]
    rasa = result["rasa"]
    shift = rasa["knn_mean_patch_after"][k]["top1"] - rasa["knn_mean_patch_before"][k]["top1"]
    rows = [
        ("Franca k-NN top-1 ≥ 90%", f"{top1[FRANCA]:.2f}%", top1[FRANCA] >= 90.0),
        ("Franca k-NN ≥ DINOv2 baseline", f"{top1[FRANCA]:.2f}% vs {top1[DINOV2]:.2f}%", top1[FRANCA] >= top1[DINOV2]),
        ("Franca keeps ≥ 95% of its k-NN at D/16", f"{100 * retention[FRANCA]:.1f}%", retention[FRANCA] >= 0.95),
        (
            "Franca keeps more at D/16 than DINOv2",
            f"{100 * retention[FRANCA]:.1f}% vs {100 * retention[DINOV2]:.1f}%",
            retention[FRANCA] > retention[DINOV2],
        ),
        (
            f"position R² after RASA ({rasa['regressor']}) < 0.05",
            f"{rasa['position_r2_after']:.3f}",
            rasa["position_r2_after"] < 0.05,
        ),
        ("mean-patch k-NN within 0.5 points after RASA", f"{shift:+.2f} points", abs(shift) <= 0.5),
    ]
    levels = [v for head in result.get("target_entropy", {}).get(FRANCA, {}).values() for v in head]
    if levels:  # absent for pretrainings logged before the training-health statistics existed
        worst = max(levels)
        rows.append(("every Franca level's final target entropy ≤ 0.8 log K", f"max {worst:.3f}", worst <= 0.8))
    return [{"goal": g, "measured": m, "met": bool(ok)} for g, m, ok in rows]


def markdown(result: dict) -> str:
    """The tables of ``fidelity.md`` (what benchmarks/RESULTS.md quotes)."""
    k = str(result["k"])
    lines = [
        f"| features | k-NN top-1 (k={k}) | k-NN top-5 | linear probe top-1 |",
        "|---|---|---|---|",
    ]
    for name, r in result["knn"].items():
        probe = f"{result['linear'][name]['top1']:.2f}" if name in result["linear"] else "not run"
        lines.append(f"| {name} | {r[k]['top1']:.2f} | {r[k]['top5']:.2f} | {probe} |")
    dims = result["matryoshka"]["dims"]
    lines += ["", "| k-NN top-1 on the first d features | " + " | ".join(f"d={d}" for d in dims) + " |"]
    lines.append("|---|" + "---|" * len(dims))
    for name, by_d in result["matryoshka"]["top1"].items():
        lines.append(f"| {name} | " + " | ".join(f"{by_d[str(d)]:.2f}" for d in dims) + " |")
    rasa = result["rasa_regressors"]
    first = next(iter(rasa.values()))
    lines += [
        "",
        "| Franca + RASA | before | " + " | ".join(f"after ({name})" for name in rasa) + " |",
        "|---|---|" + "---|" * len(rasa),
        f"| position R² of patch tokens (linear read-out), plain test images | {first['position_r2_before']:.3f} | "
        + " | ".join(f"{r['position_r2_after']:.3f}" for r in rasa.values())
        + " |",
        f"| position R² of patch tokens, RASA-augmented crops | {first['augmented_position_r2_before']:.3f} | "
        + " | ".join(f"{r['augmented_position_r2_after']:.3f}" for r in rasa.values())
        + " |",
        f"| k-NN top-1 on the mean patch token | {first['knn_mean_patch_before'][k]['top1']:.2f} | "
        + " | ".join(f"{r['knn_mean_patch_after'][k]['top1']:.2f}" for r in rasa.values())
        + " |",
        "",
        "| final teacher-target entropy / log K, levels D/16 … D | DINO | iBOT |",
        "|---|---|---|",
        *(
            f"| {name} | {_levels(e['dino'])} | {_levels(e['ibot'])} |"
            for name, e in result.get("target_entropy", {}).items()
        ),
        "",
        "| goal | measured | met |",
        "|---|---|---|",
    ]
    lines += [f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else 'no'} |" for g in result["goals"]]
    return "\n".join(lines) + "\n"


def _levels(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values) if values else "–"


def _save_figure(fig, path: Path) -> None:
    from matplotlib import pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, buffer.getvalue())


def plot_matryoshka_comparison(path: Path, result: dict) -> None:
    """k-NN top-1 against the prefix size d (log2 axis), one line per model, the floors as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    k = str(result["k"])
    dims = sorted(result["matryoshka"]["dims"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_d in result["matryoshka"]["top1"].items():
        ax.plot(dims, [by_d[str(d)] for d in dims], marker="o", label=name)
    for name, style in ((PIXELS, ":"), (RANDOM_PATCH, "--")):
        ax.axhline(result["knn"][name][k]["top1"], color="gray", linestyle=style, label=f"{name} (all features)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims, [str(d) for d in dims])
    ax.set_xlabel("feature dimensions used (first d of the CLS token)")
    ax.set_ylabel(f"k-NN top-1 (k={k}), %")
    ax.set_title(f"Matryoshka slices on Fashion-MNIST test ({result['budget']} budget, seed {result['seed']})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_loss_comparison(path: Path, metrics: dict[str, Path]) -> None:
    """One panel per loss term, one line per run (Franca's DINO and iBOT terms sum its 5 Matryoshka levels)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    records = {name: read_metrics(p) for name, p in metrics.items()}
    fig, axes = plt.subplots(1, len(LOSS_TERMS), figsize=(3.2 * len(LOSS_TERMS), 2.9), squeeze=False)
    for ax, term in zip(axes[0], LOSS_TERMS):
        for name, rows in records.items():
            ax.plot([r["iteration"] for r in rows], [r[term] for r in rows], lw=1.2, label=name)
        ax.set_title(term, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Training losses (Franca's DINO/iBOT terms sum its 5 Matryoshka levels)", fontsize=9)
    fig.tight_layout()
    _save_figure(fig, path)


def print_summary(result: dict) -> None:
    k = str(result["k"])
    print(f"\nFashion-MNIST test, {result['test_images']} images; k-NN bank / probe: {result['train_images']} images")
    print(f"{'features':<30} {'k-NN top-1':>10} {'linear':>8}")
    for name, r in result["knn"].items():
        probe = f"{result['linear'][name]['top1']:>7.2f}%" if name in result["linear"] else "     --"
        print(f"{name:<30} {r[k]['top1']:>9.2f}% {probe}")
    dims = result["matryoshka"]["dims"]
    print("\nk-NN top-1 on the first d features: " + " ".join(f"{d:>6}" for d in dims))
    for name, by_d in result["matryoshka"]["top1"].items():
        print(f"{name:<35} " + " ".join(f"{by_d[str(d)]:>6.2f}" for d in dims))
    rasa = result["rasa"]
    print(
        f"\nRASA ({rasa['planes_removed']} planes): position R² {rasa['position_r2_before']:.3f} → "
        f"{rasa['position_r2_after']:.3f}; mean-patch k-NN {rasa['knn_mean_patch_before'][k]['top1']:.2f}% → "
        f"{rasa['knn_mean_patch_after'][k]['top1']:.2f}%"
    )
    print("\ngoals:")
    for g in result["goals"]:
        print(f"  [{'met' if g['met'] else 'MISSED'}] {g['goal']}: {g['measured']}")
    print(f"\ntimings (s): {result['timings_s']}")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("fidelity", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--budget", choices=("cpu", "gpu"), required=True, help="configs/fidelity/<budget>.yaml")
    p.add_argument("--out", default=None, help="output folder (default runs/fidelity_<budget>)")
    p.add_argument("--seed", type=int, default=0, help="seed of both pretrainings, RASA and the evaluation splits")
    p.add_argument("--data-root", default=None, help="folder of the Fashion-MNIST idx files (default: Debian's)")
    p.add_argument(
        "--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="change a key of the budget file"
    )
    p.add_argument("--fresh", action="store_true", help="retrain everything instead of resuming in --out")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    runner = Runner(args)
    result = runner.run()
    out = runner.out
    write_json_atomic(out / "fidelity.json", result)
    atomic_write(out / "fidelity.md", markdown(result).encode())
    plot_matryoshka_comparison(out / "matryoshka_fidelity.png", result)
    plot_loss_comparison(out / "loss_curves.png", {n: d / "training_metrics.json" for n, d in runner.run_dirs.items()})
    print_summary(result)
    print(f"\nresults: {out / 'fidelity.json'}, {out / 'fidelity.md'}, {out / 'matryoshka_fidelity.png'}")
    return result


if __name__ == "__main__":
    main()
