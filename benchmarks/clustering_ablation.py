"""Does the clustering learn? Train named variants of a recipe and compare their teacher targets and k-NN.

``python benchmarks/clustering_ablation.py [--config-file configs/train/quickstart.yaml] [--variants a b ...]
[--set key=value ...] [--output-dir runs/clustering_ablation]`` (``--set optim.epochs=2`` for 100 iterations)

Every variant trains the same recipe, data and seed with its own config overrides (:data:`VARIANTS`; ``--set``
applies to all), then reads from its ``training_metrics.json`` the last logged per-level teacher-target and student
entropies (fractions of log K, ``franca.train.health``) and scores the teacher's CLS token by weighted k-NN on the
Fashion-MNIST test split. A run whose outputs exist is reused (delete its folder to redo it). Writes
``results.json`` and ``results.md`` in the output folder; docs/training_dynamics.md reads them.
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
from torch.utils.data import Subset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import environment, markdown_table, write_json_atomic  # noqa: E402
from franca.data.augmentations import make_classification_eval_transform  # noqa: E402
from franca.data.loaders import make_dataset  # noqa: E402
from franca.hub import load_backbone  # noqa: E402
from franca.train import train as trainer  # noqa: E402
from franca.train.config import apply_scaling_rules, load_config  # noqa: E402
from franca.train.health import level_values  # noqa: E402
from franca.train.ssl_meta_arch import build_backbone  # noqa: E402
from franca.utils.features import extract_features  # noqa: E402
from franca.utils.knn import knn_accuracies  # noqa: E402

# Each variant changes one thing of the recipe (docs/training_dynamics.md explains why each is there).
VARIANTS: dict[str, list[str]] = {
    "recipe": [],
    "koleo_only": ["dino.loss_weight=0", "ibot.loss_weight=0"],
    "clustering_only": ["dino.koleo_loss_weight=0"],
    "original_momentum": ["teacher.momentum_teacher=0.99", "teacher.final_momentum_teacher=1.0"],
    "original_teacher_temp": ["teacher.warmup_teacher_temp=0.04", "teacher.teacher_temp=0.07"],
    "original_crop_scales": ["crops.global_crops_scale=[0.32,1.0]", "crops.local_crops_scale=[0.05,0.32]"],
    "softmax_centering": ["train.centering=centering"],
    "no_ibot": ["ibot.mask_sample_probability=0"],
    "prototypes_64": ["dino.head_n_prototypes=64", "ibot.head_n_prototypes=64"],
    "original_head_init": ["dino.head_init=trunc_normal"],
    "original_head_form": ["dino.mrl_l2_norm=false"],
    "freeze_last_layer": ["optim.freeze_last_layer_epochs=1"],
    "dinov2_baseline": ["dino.MRL=false", "train.use_inverse_block=false", "train.roll=false"],
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "clustering_ablation", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--config-file", default=str(REPO / "configs" / "train" / "quickstart.yaml"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--set", action="append", default=[], help="override for every variant, e.g. optim.epochs=2")
    p.add_argument("--output-dir", default="runs/clustering_ablation")
    p.add_argument("--test-dataset", default="FashionMNIST:split=test")
    p.add_argument("--knn-train-samples", type=int, default=10000, help="first N training images as the bank")
    p.add_argument("--knn-test-samples", type=int, default=0, help="first N test images (0 = all)")
    p.add_argument("--k", type=int, default=20)
    return p


def teacher_export(out: Path) -> Path:
    exports = sorted(out.glob("eval/training_*/teacher_checkpoint.pth"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not exports:
        raise FileNotFoundError(f"no teacher export under {out}/eval; the training of this variant did not finish")
    return exports[-1]


def knn_top1(model: torch.nn.Module, train_set, test_set, k: int, name: str) -> float:
    train = extract_features(model, train_set, batch_size=512, name=f"{name} bank")
    test = extract_features(model, test_set, batch_size=512, name=f"{name} test")
    return knn_accuracies(*train, *test, ks=(k,))[str(k)]["top1"]


def summarize(metrics_file: Path) -> dict:
    """The last logged health statistics and loss terms of a run."""
    last = json.loads(metrics_file.read_text().splitlines()[-1])
    summary = {"iteration": last["iteration"], "teacher_cls_spread": last.get("teacher_cls_spread")}
    for head in ("dino", "ibot"):
        for kind in ("target_entropy", "student_entropy"):
            summary[f"{head}_{kind}"] = level_values(last, head, kind)
    summary["losses"] = {k: v for k, v in last.items() if k.endswith("_loss")}
    return summary


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    out_root = Path(args.output_dir)
    results: dict = {"environment": environment(torch.device("cpu")), "command": shlex.join(sys.argv), "variants": {}}
    base_cfg = load_config(args.config_file, args.set)
    apply_scaling_rules(base_cfg, world_size=1)
    size = base_cfg.crops.global_crops_size
    transform = make_classification_eval_transform(resize_size=size, crop_size=size)
    bank = make_dataset(base_cfg.train.dataset_path, transform=transform)
    bank = Subset(bank, range(min(args.knn_train_samples, len(bank)))) if args.knn_train_samples else bank
    test = make_dataset(args.test_dataset, transform=transform)
    test = Subset(test, range(min(args.knn_test_samples, len(test)))) if args.knn_test_samples else test

    torch.manual_seed(base_cfg.train.seed)
    floor = knn_top1(build_backbone(base_cfg, drop_path=False), bank, test, args.k, "random init")
    results["random_init_knn"] = floor
    for name in args.variants:
        overrides = [*args.set, *VARIANTS[name]]
        out = out_root / name
        print(f"\n=== {name}: {' '.join(overrides) or '(the recipe)'}", flush=True)
        try:
            export = teacher_export(out)
        except FileNotFoundError:
            trainer.main(["--config-file", args.config_file, "--output-dir", str(out), "--no-resume", *overrides])
            export = teacher_export(out)
        record = {"overrides": overrides, **summarize(out / "training_metrics.json")}
        record["knn_top1"] = knn_top1(load_backbone(export), bank, test, args.k, name)
        results["variants"][name] = record
        write_json_atomic(out_root / "results.json", results)

    rows = [
        [
            name,
            f"{max(r['dino_target_entropy']):.2f}",
            f"{max(r['ibot_target_entropy']):.2f}" if r["ibot_target_entropy"] else "–",
            f"{max(r['dino_student_entropy']):.2f}",
            r["teacher_cls_spread"],
            r["knn_top1"],
        ]
        for name, r in results["variants"].items()
    ]
    headers = ["variant", "max DINO H/logK", "max iBOT H/logK", "max student H/logK", "CLS spread", "k-NN top-1 %"]
    table = markdown_table(headers, rows) + f"\n\nrandom-init CLS k-NN: {floor:.2f}%\n"
    (out_root / "results.md").write_text(table)
    print("\n" + table)
    return results


if __name__ == "__main__":
    main()
