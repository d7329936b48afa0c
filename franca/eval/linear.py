"""Linear probing of a frozen backbone with a grid of classifiers trained together (DINOv2 protocol, valeoai/Franca
``franca/eval/linear.py``).

Each classifier reads the CLS tokens of the last ``n`` blocks (layer-normed, concatenated in block order) and, with
``avgpool``, the mean patch token of the last block; the grid is n ∈ {1, 4} × avgpool ∈ {False, True} × 13 learning
rates (1e-5 … 0.1, scaled by batch/256). All classifiers see the same batches: Linear init N(0, 0.01²), bias 0,
SGD momentum 0.9, no weight decay, cosine decay to 0 over epochs × iterations-per-epoch, cross-entropy summed over
the grid. After every epoch all classifiers are scored on the validation set; the best final one is reported.

Training images either go through the linear-eval train transform (RandomResizedCrop + flip, the original) and the
backbone at every step, or, with ``--precompute-features``, through the evaluation transform once: features are
extracted a single time and batches are drawn from them (much faster; no augmentation, so accuracy is usually a little
lower). Validation features never depend on the training step and are extracted once in both modes.
With ``--rasa-weights`` the mean patch token is taken from the RASA-debiased patch tokens.

``python -m franca.eval.linear --weights W --train-dataset STR --val-dataset STR --output-dir D``
"""

import argparse
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from franca.eval.lib import common
from franca.utils.accuracy import topk_accuracy
from franca.utils.features import default_device
from franca.utils.logging import Progress
from franca.utils.weight_files import atomic_torch_save

DEFAULT_LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
DEFAULT_N_LAST_BLOCKS = (1, 4)
DEFAULT_AVGPOOLS = (False, True)


class ProbeFeatures(nn.Module):
    """Tokens [B, n+1, D]: the normed CLS token of each of the last ``n`` blocks, then the last block's mean patch
    token (RASA-debiased with ``use_rasa_head``)."""

    def __init__(self, backbone: nn.Module, n_last_blocks: int = 4, use_rasa_head: bool = False):
        super().__init__()
        depth = len(backbone.blocks)
        if not 1 <= n_last_blocks <= depth:
            raise ValueError(
                f"n_last_blocks={n_last_blocks} must be in [1, {depth}] (the backbone's depth): pass --n-last-blocks "
                f"values <= {depth}"
            )
        if use_rasa_head and backbone.rasa_head is None:
            raise ValueError("use_rasa_head=True needs a backbone with a RASA head: pass --rasa-weights")
        self.backbone, self.n_last_blocks, self.use_rasa_head = backbone, n_last_blocks, use_rasa_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = self.backbone.get_intermediate_layers(x, self.n_last_blocks, return_class_token=True)
        patches = layers[-1][0]
        if self.use_rasa_head:
            patches = self.backbone.rasa_head(patches)
        return torch.stack([cls for _, cls in layers] + [patches.mean(dim=1)], dim=1)


@dataclass(frozen=True)
class ProbeSetting:
    n_blocks: int
    avgpool: bool
    lr: float

    @property
    def name(self) -> str:
        return f"blocks{self.n_blocks}_avgpool{int(self.avgpool)}_lr{self.lr:g}"


def probe_input(tokens: torch.Tensor, n_blocks: int, avgpool: bool) -> torch.Tensor:
    """Classifier input from ProbeFeatures tokens [B, n_max+1, D]: CLS of the last ``n_blocks`` (+ mean patch)."""
    n_max = tokens.shape[1] - 1
    parts = [tokens[:, n_max - n_blocks : n_max].flatten(1)]
    if avgpool:
        parts.append(tokens[:, n_max])
    return torch.cat(parts, dim=1).float()


class ClassifierGrid(nn.Module):
    """One ``nn.Linear`` per setting (N(0, 0.01²) weights, zero bias); forward returns their logits, in order."""

    def __init__(self, settings: list[ProbeSetting], embed_dim: int, num_classes: int):
        super().__init__()
        self.settings = settings
        self.classifiers = nn.ModuleList()
        for s in settings:
            linear = nn.Linear(embed_dim * (s.n_blocks + int(s.avgpool)), num_classes)
            nn.init.normal_(linear.weight, mean=0.0, std=0.01)
            nn.init.zeros_(linear.bias)
            self.classifiers.append(linear)

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        inputs = {}
        for s in self.settings:
            inputs.setdefault((s.n_blocks, s.avgpool), probe_input(tokens, s.n_blocks, s.avgpool))
        return [clf(inputs[(s.n_blocks, s.avgpool)]) for s, clf in zip(self.settings, self.classifiers)]


def make_settings(
    n_last_blocks: tuple[int, ...] = DEFAULT_N_LAST_BLOCKS,
    avgpools: tuple[bool, ...] = DEFAULT_AVGPOOLS,
    learning_rates: tuple[float, ...] = DEFAULT_LEARNING_RATES,
) -> list[ProbeSetting]:
    return [ProbeSetting(n, a, lr) for n in n_last_blocks for a in avgpools for lr in learning_rates]


@torch.no_grad()
def evaluate_grid(grid: ClassifierGrid, tokens: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> list:
    """[{top1, top5}] of every classifier on precomputed tokens."""
    device = next(grid.parameters()).device
    grid.eval()
    logits = [[] for _ in grid.settings]
    for batch in tokens.split(batch_size):
        for i, out in enumerate(grid(batch.to(device))):
            logits[i].append(out.cpu())
    grid.train()
    return [
        {"top1": topk_accuracy(torch.cat(lg), labels, 1), "top5": topk_accuracy(torch.cat(lg), labels, 5)}
        for lg in logits
    ]


def make_optimizer(grid: ClassifierGrid, batch_size: int, total_iterations: int):
    """SGD (momentum 0.9, no weight decay), one parameter group per classifier at lr·batch_size/256, and a
    per-iteration cosine decay to 0 over ``total_iterations`` (as the original)."""
    groups = [
        {"params": clf.parameters(), "lr": s.lr * batch_size / 256.0} for s, clf in zip(grid.settings, grid.classifiers)
    ]
    optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=0.0)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_iterations, eta_min=0.0)


def train_classifier_grid(
    grid: ClassifierGrid,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
    epochs: int,
    iterations_per_epoch: int,
    val_tokens: torch.Tensor,
    val_labels: torch.Tensor,
    log_every_s: float = 10.0,
) -> tuple[list[dict], list[dict]]:
    """Train every classifier on the same ``batches`` of (tokens, labels); returns (final results, per-epoch best).

    See :func:`make_optimizer` for the optimisation; ``batches`` must yield ``batch_size`` samples each.
    """
    if epochs < 1 or iterations_per_epoch < 1:
        raise ValueError(f"epochs={epochs} and iterations_per_epoch={iterations_per_epoch} must both be >= 1")
    device = next(grid.parameters()).device
    total = epochs * iterations_per_epoch
    optimizer, scheduler = make_optimizer(grid, batch_size, total)
    progress = Progress("linear probe", total)
    history, results, last_print = [], [], time.perf_counter()
    grid.train()
    for iteration in range(1, total + 1):
        tokens, labels = next(batches)
        labels = labels.to(device)
        loss = sum(F.cross_entropy(out, labels) for out in grid(tokens.to(device)))
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"linear probe loss is {loss.item()} at iteration {iteration}: a classifier diverged; drop the largest "
                "values of --learning-rates"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if time.perf_counter() - last_print > log_every_s or iteration == total:
            progress.print(iteration, f"mean loss {loss.item() / len(grid.settings):.4f}")
            last_print = time.perf_counter()
        if iteration % iterations_per_epoch == 0:
            results = evaluate_grid(grid, val_tokens, val_labels)
            best = max(range(len(results)), key=lambda i: results[i]["top1"])
            history.append(
                {"epoch": iteration // iterations_per_epoch, "best": grid.settings[best].name, **results[best]}
            )
            print(
                f"epoch {history[-1]['epoch']}/{epochs}: best {grid.settings[best].name} "
                f"top-1 {results[best]['top1']:.2f}%",
                flush=True,
            )
    return results, history


def precomputed_batches(
    tokens: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches in the training loaders' order: concatenated seeded permutations (franca.data.samplers)."""
    from franca.data.samplers import InfiniteSampleKeySampler

    keys = iter(InfiniteSampleKeySampler(len(tokens), batch_size, seed=seed))
    while True:
        index = torch.tensor([next(keys).index for _ in range(batch_size)])
        yield tokens[index], labels[index]


def _stack_images_and_targets(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([sample[0] for sample in batch]), torch.tensor([sample[1] for sample in batch])


def augmented_batches(
    features: ProbeFeatures, dataset: Dataset, transform, batch_size: int, seed: int, num_workers: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches of tokens of freshly augmented images (bf16 autocast on GPU), in the training loaders' order
    with augmentations seeded per sample (franca.data.make_train_data_loader)."""
    from franca.data import make_train_data_loader

    device = next(features.parameters()).device
    loader = make_train_data_loader(
        dataset, transform, _stack_images_and_targets, batch_size, seed, num_workers=num_workers
    )
    for images, labels in loader:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            tokens = features(images.to(device, non_blocking=True))
        yield tokens.float(), labels


def dataset_labels(dataset: Dataset, dataset_str: str) -> torch.Tensor:
    """All targets of a dataset, read without decoding images."""
    if not hasattr(dataset, "get_target"):
        raise ValueError(f"cannot read the labels of {type(dataset).__name__} without decoding it; pass --num-classes")
    return common.require_labels(torch.tensor([dataset.get_target(i) for i in range(len(dataset))]), dataset_str)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "franca.eval.linear", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    common.add_backbone_arguments(p)
    p.add_argument("--train-dataset", required=True, help="dataset string, e.g. ImageNet:split=TRAIN:root=R")
    p.add_argument("--val-dataset", required=True, help="dataset string, e.g. ImageNet:split=VAL:root=R")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--iterations-per-epoch", type=int, default=1250)
    p.add_argument("--train-batch-size", type=int, default=128, help="classifier batch size (original: 128)")
    p.add_argument("--learning-rates", type=float, nargs="+", default=list(DEFAULT_LEARNING_RATES))
    p.add_argument("--n-last-blocks", type=int, nargs="+", default=list(DEFAULT_N_LAST_BLOCKS))
    p.add_argument("--precompute-features", action="store_true", help="extract train features once, no augmentation")
    p.add_argument("--num-classes", type=int, default=None, help="default: from the training labels")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_eval_args(get_args_parser(), argv)
    from franca.data import make_classification_train_transform, make_dataset

    torch.manual_seed(args.seed)
    backbone = common.load_backbone_for_eval(args.weights, args.rasa_weights)
    evaluation = common.eval_settings(args, backbone, common.CLASSIFICATION_PROTOCOLS, classification=True)
    features = ProbeFeatures(backbone, max(args.n_last_blocks), evaluation.use_rasa_head).to(default_device())
    val_tokens, val_labels = common.extract_labelled_features(features, args.val_dataset, evaluation, "val")
    if args.precompute_features:
        train_tokens, train_labels = common.extract_labelled_features(features, args.train_dataset, evaluation, "train")
        num_classes = args.num_classes or int(train_labels.max()) + 1
        batches = precomputed_batches(train_tokens, train_labels, args.train_batch_size, args.seed)
    else:
        train_set = make_dataset(args.train_dataset, decoding=evaluation.decoding)
        num_classes = args.num_classes or int(dataset_labels(train_set, args.train_dataset).max()) + 1
        transform = make_classification_train_transform(evaluation.image_size[0])
        batches = augmented_batches(features, train_set, transform, args.train_batch_size, args.seed, args.num_workers)
    num_classes = max(num_classes, int(val_labels.max()) + 1)
    settings = make_settings(tuple(args.n_last_blocks), DEFAULT_AVGPOOLS, tuple(args.learning_rates))
    grid = ClassifierGrid(settings, backbone.embed_dim, num_classes).to(default_device())
    results, history = train_classifier_grid(
        grid, batches, args.train_batch_size, args.epochs, args.iterations_per_epoch, val_tokens, val_labels
    )
    best = max(range(len(results)), key=lambda i: results[i]["top1"])
    atomic_torch_save(
        {
            "setting": asdict(settings[best]),
            "num_classes": num_classes,
            "state_dict": grid.classifiers[best].state_dict(),
        },
        f"{args.output_dir}/linear_probe_best.pth",
    )
    record = {
        "weights": args.weights,
        "rasa_weights": args.rasa_weights,
        "train_dataset": args.train_dataset,
        "val_dataset": args.val_dataset,
        "mode": "precomputed" if args.precompute_features else "augmented",
        "epochs": args.epochs,
        "iterations_per_epoch": args.iterations_per_epoch,
        "train_batch_size": args.train_batch_size,
        "best": {"name": settings[best].name, **asdict(settings[best]), **results[best]},
        "classifiers": [{"name": s.name, **asdict(s), **r} for s, r in zip(settings, results)],
        "history": history,
    }
    datasets = {"train": args.train_dataset, "val": args.val_dataset}
    path = common.write_results(args.output_dir, "linear", record, common.run_metadata(args, evaluation, datasets))
    print(f"linear probe: best {settings[best].name} top-1 {results[best]['top1']:.2f}% -> {path}")
    return record


if __name__ == "__main__":
    main()
