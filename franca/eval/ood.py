"""Out-of-distribution detection from frozen features: k-NN distance, MSP and energy scores, AUROC and FPR@95%TPR.

Scores (larger = more in-distribution; in-distribution test images are the positives):
- ``knn_k<k>``: minus the Euclidean distance from the L2-normalised feature to its k-th nearest L2-normalised
  in-distribution training feature (Sun et al. 2022, "Out-of-distribution detection with deep nearest neighbors");
- ``msp``: the maximum softmax probability of a linear probe (Hendrycks & Gimpel 2017);
- ``energy``: logsumexp of the probe's logits, i.e. minus the free energy at T = 1 (Liu et al. 2020).
The probe is the multinomial logistic regression of :mod:`franca.eval.log_regression` fitted on in-distribution
training features, C chosen on a 10% holdout. The feature is the CLS token, or with ``--rasa-weights`` the mean
RASA-debiased patch token.

``python -m franca.eval.ood --weights W --train-dataset STR --test-dataset STR --ood-dataset STR [STR ...]
--output-dir D``
"""

import argparse

import torch
import torch.nn.functional as F

from franca.eval.lib import common
from franca.eval.lib.logreg_backends import BACKENDS, LinearModel, make_backend
from franca.eval.lib.logreg_search import c_grid, select_c_and_fit
from franca.eval.lib.metrics import ood_metrics
from franca.eval.lib.models import FeatureModel
from franca.utils.accuracy import topk_accuracy
from franca.utils.features import default_device

DEFAULT_KNN_KS = (50,)


@torch.no_grad()
def knn_distance_scores(
    train_feats: torch.Tensor,
    test_feats: torch.Tensor,
    ks: tuple[int, ...] = DEFAULT_KNN_KS,
    chunk_size: int = 1024,
    device: torch.device | None = None,
) -> dict[int, torch.Tensor]:
    """{k: −‖z − z_(k)‖} for each test feature z, with z_(k) its k-th nearest training feature (all normalised).

    Neighbours are ranked by cosine similarity (the same order as distance on the unit sphere); the distance itself
    is computed from the difference vector, which keeps its precision for near neighbours where 2 − 2·cos would not.
    Runs on ``device`` (default: the GPU when there is one); scores are returned on the CPU.
    """
    if min(ks) < 1 or max(ks) > len(train_feats):
        raise ValueError(
            f"k-NN OOD needs 1 <= k <= {len(train_feats)} (the number of training features), got {ks}: choose "
            "--knn-k values in that range"
        )
    device = device or default_device()
    train = F.normalize(train_feats.to(device, torch.float32), dim=1)
    scores = {k: [] for k in ks}
    for batch in test_feats.split(chunk_size):
        batch = F.normalize(batch.to(device, torch.float32), dim=1)
        neighbours = (batch @ train.T).topk(max(ks), dim=1).indices
        for k in ks:
            scores[k].append(-(batch - train[neighbours[:, k - 1]]).norm(dim=1).cpu())
    return {k: torch.cat(s) for k, s in scores.items()}


def probe_scores(model: LinearModel, feats: torch.Tensor) -> dict[str, torch.Tensor]:
    """MSP and energy (logsumexp) scores of a linear probe."""
    logits = model.logits(feats)
    return {"msp": logits.softmax(dim=1).max(dim=1).values, "energy": logits.logsumexp(dim=1)}


def all_scores(
    train_feats: torch.Tensor, probe: LinearModel | None, feats: torch.Tensor, ks: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    scores = {f"knn_k{k}": s for k, s in knn_distance_scores(train_feats, feats, ks).items()}
    if probe is not None:
        scores.update(probe_scores(probe, feats))
    return scores


def ood_evaluation(
    train_feats: torch.Tensor,
    in_feats: torch.Tensor,
    ood_feats: dict[str, torch.Tensor],
    ks: tuple[int, ...] = DEFAULT_KNN_KS,
    probe: LinearModel | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """{ood name: {score name: {auroc, fpr95}}} for in-distribution test features against each OOD set."""
    in_scores = all_scores(train_feats, probe, in_feats, ks)
    results = {}
    for name, feats in ood_feats.items():
        out_scores = all_scores(train_feats, probe, feats, ks)
        results[name] = {score: ood_metrics(in_scores[score], out_scores[score]) for score in in_scores}
    return results


def extract_ood_features(
    model: torch.nn.Module, dataset_str: str, settings: common.EvalSettings, name: str
) -> torch.Tensor:
    """Features of an OOD set; its labels are not used (an unlabelled ImageFolder is fine)."""
    return common.extract_eval_features(model, dataset_str, settings, name)[0]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("franca.eval.ood", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    common.add_backbone_arguments(p)
    p.add_argument("--train-dataset", required=True, help="in-distribution training set (k-NN bank, probe)")
    p.add_argument("--test-dataset", required=True, help="in-distribution test set (the positives)")
    p.add_argument("--ood-dataset", required=True, nargs="+", help="one or more out-of-distribution dataset strings")
    p.add_argument("--knn-k", type=int, nargs="+", default=list(DEFAULT_KNN_KS), help="k of the k-NN distance")
    p.add_argument("--no-probe", action="store_true", help="skip the linear probe (MSP and energy scores)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="logistic-regression backend of the probe")
    p.add_argument("--c-grid-size", type=int, default=12, help="probe C values in 10^linspace(-6, 5)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_eval_args(get_args_parser(), argv)
    backbone = common.load_backbone_for_eval(args.weights, args.rasa_weights)
    settings = common.eval_settings(args, backbone, common.CLASSIFICATION_PROTOCOLS, classification=True)
    model = FeatureModel(backbone, settings.use_rasa_head)
    train_feats, train_labels = common.extract_labelled_features(
        model, args.train_dataset, settings, "in-distribution train"
    )
    in_feats, in_labels = common.extract_labelled_features(model, args.test_dataset, settings, "in-distribution test")
    ood_feats = {}
    for i, dataset_str in enumerate(args.ood_dataset):
        name = f"ood {i + 1}/{len(args.ood_dataset)}"
        ood_feats[dataset_str] = extract_ood_features(model, dataset_str, settings, name)
    record = {
        "weights": args.weights,
        "rasa_weights": args.rasa_weights,
        "train_dataset": args.train_dataset,
        "test_dataset": args.test_dataset,
        "knn_k": args.knn_k,
    }
    probe = None
    if not args.no_probe:
        backend = make_backend(args.backend)
        num_classes = int(max(train_labels.max(), in_labels.max())) + 1
        probe, best_c, _ = select_c_and_fit(
            train_feats,
            train_labels,
            c_grid(args.c_grid_size),
            backend,
            seed=args.seed,
            num_classes=num_classes,
            name="OOD probe",
        )
        record["probe"] = {
            "backend": backend.name,
            "c": best_c,
            "in_distribution_top1": topk_accuracy(probe.logits(in_feats), in_labels, 1),
        }
    record["results"] = ood_evaluation(train_feats, in_feats, ood_feats, tuple(args.knn_k), probe)
    datasets = {"train": args.train_dataset, "test": args.test_dataset, "ood": list(args.ood_dataset)}
    path = common.write_results(args.output_dir, "ood", record, common.run_metadata(args, settings, datasets))
    for name, scores in record["results"].items():
        for score, m in scores.items():
            print(f"{name} {score}: AUROC {m['auroc']:.2f}%  FPR@95 {m['fpr95']:.2f}%")
    print(f"-> {path}")
    return record


if __name__ == "__main__":
    main()
