"""Weighted k-NN classification on frozen features (reference §7; the DINO protocol).

Features are L2-normalised; each test sample takes its k most cosine-similar training samples, weights each by
exp(sim / T) (T = 0.07) and sums the weights per class; the class with the largest vote wins. Top-1 and top-5 accuracy
for each k in {10, 20, 100, 200}.

``python -m franca.eval.knn --weights W --train-dataset STR --val-dataset STR --output-dir D``
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from franca.eval.features import default_device, extract_features

DEFAULT_KS = (10, 20, 100, 200)


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    ks: tuple[int, ...] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> dict[int, torch.Tensor]:
    """Class votes [N_test, C] for each k (weighted by exp(cos/T) over the k nearest training samples)."""
    if len(train_features) == 0:
        raise ValueError("k-NN needs at least one training feature")
    num_classes = num_classes or int(train_labels.max()) + 1
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    kmax = min(max(ks), len(train))
    votes = {k: [] for k in ks}
    for start in range(0, len(test), chunk_size):
        sims, idx = (test[start : start + chunk_size] @ train.T).topk(kmax, dim=1)
        weights = (sims / temperature).exp()
        neighbour_labels = train_labels[idx]
        for k in ks:
            kk = min(k, kmax)
            v = torch.zeros(len(idx), num_classes)
            v.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            votes[k].append(v)
    return {k: torch.cat(v) for k, v in votes.items()}


def accuracy(votes: torch.Tensor, labels: torch.Tensor, topk: int = 1) -> float:
    """Share of samples whose label is among the ``topk`` highest votes, in percent."""
    topk = min(topk, votes.shape[1])
    hits = (votes.topk(topk, dim=1).indices == labels[:, None]).any(dim=1)
    return 100.0 * hits.float().mean().item()


def knn_accuracies(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: tuple[int, ...] = DEFAULT_KS,
    temperature: float = 0.07,
) -> dict[str, dict[str, float]]:
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    votes = knn_classify(train_features, train_labels, test_features, ks, temperature, num_classes)
    return {
        f"{k}": {"top1": accuracy(v, test_labels, 1), "top5": accuracy(v, test_labels, 5)} for k, v in votes.items()
    }


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("franca.eval.knn", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--weights", required=True, help="hub name (franca_vitb14[:IN21K]) or checkpoint path")
    p.add_argument("--rasa-weights", default=None, help="RASA head file: classify RASA-debiased mean patch tokens")
    p.add_argument("--train-dataset", required=True, help="dataset string, e.g. ImageNet:split=TRAIN:root=R")
    p.add_argument("--val-dataset", required=True, help="dataset string, e.g. ImageNet:split=VAL:root=R")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--nb-knn", type=int, nargs="+", default=list(DEFAULT_KS))
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--resize-size", type=int, default=256)
    p.add_argument("--crop-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=4)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    from franca.data.loaders import make_classification_eval_transform, make_dataset
    from franca.eval.models import FeatureModel
    from franca.hub import load_backbone

    backbone = load_backbone(args.weights, rasa_weights=args.rasa_weights)
    model = FeatureModel(backbone, use_rasa_head=args.rasa_weights is not None)
    transform = make_classification_eval_transform(resize_size=args.resize_size, crop_size=args.crop_size)
    device = default_device()
    feats = {}
    for split in ("train", "val"):
        dataset = make_dataset(getattr(args, f"{split}_dataset"), transform=transform)
        feats[split] = extract_features(model, dataset, args.batch_size, args.num_workers, device, name=split)
    results = knn_accuracies(*feats["train"], *feats["val"], ks=tuple(args.nb_knn), temperature=args.temperature)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"weights": args.weights, "rasa_weights": args.rasa_weights, "temperature": args.temperature, **results}
    (out / "results_eval_knn.json").write_text(json.dumps(record, indent=2))
    for k, r in results.items():
        print(f"k={k}: top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%")
    return record


if __name__ == "__main__":
    main()
