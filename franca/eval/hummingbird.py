"""HummingBird in-context segmentation (Balažević et al. 2023, "Towards In-context Scene Understanding"), following
the settings of the open re-implementation (open-hummingbird-eval) through which Franca reports it (its README).

1. Memory: every train image (``--augmentation-epochs`` passes of random resized crops, scale (0.5, 2.0), plus colour
   jitter; 0 = one pass of plain resizing) is resized to ``--image-size`` (default: the size the checkpoint was
   trained at; ``--protocol open-hummingbird``: 504×504) and encoded; each patch keeps its
   L2-normalised feature and its soft label = the share of each class among the labelled pixels of the patch.
   ``--patches-per-image`` patches are kept per image and pass, by default ``memory_size // (n_images · passes)``
   (``--memory-size`` 1,024,000 = 1024·10³, the middle column of the open protocol's table). Patches are picked
   rare-class first: a patch scores the sum, over the classes it contains, of the number of the image's patches
   containing that class, times U(0, 1); the lowest scores are kept. Patches without labelled pixels are never kept.
2. Retrieval: every val patch takes its k = 30 most cosine-similar memory patches; the class scores are the
   softmax(sim / τ)-weighted mean of their soft labels, τ = 0.02 (the open code's ``beta``).
3. Prediction: the score map [C, h, w] is upsampled bilinearly to the mask resolution and arg-maxed; mIoU over the
   val set (255 = ignore). Masks are compared at the input resolution (resized by nearest neighbour), as the open
   protocol, or with ``--eval-resolution original`` at their own size.

Nearest neighbours: exact inner-product search with faiss (``IndexFlatIP``) when installed and running on CPU, else
an exact chunked matmul + top-k in torch (on the GPU when there is one); ``--nn-backend`` forces either.

``python -m franca.eval.hummingbird --weights W [--rasa-weights R] --train-dataset STR --val-dataset STR
--output-dir D``
"""

import argparse
import importlib.util
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from franca.eval.lib import common
from franca.eval.lib.pictures import denormalise, label_grid, png_bytes
from franca.eval.lib.segmentation import (
    IGNORE_INDEX,
    PairedTransformDataset,
    SegmentationTransform,
    check_input_size,
    confusion_matrix,
    dataset_num_classes,
    iterate_dense_batches,
    patch_label_distribution,
    segmentation_metrics,
)
from franca.utils.atomic import atomic_write
from franca.utils.features import default_device

DEFAULT_MEMORY_SIZE = 1_024_000
DEFAULT_NEIGHBOURS = 30
DEFAULT_TEMPERATURE = 0.02
PROTOCOLS = {"open-hummingbird": (504, 504)}
PREDICTIONS_FILE = "hummingbird_predictions.png"


@dataclass(frozen=True)
class HummingbirdSettings:
    """The retrieval protocol's own settings (module docstring); ``patches_per_image`` None = memory size / (images ·
    passes)."""

    memory_size: int = DEFAULT_MEMORY_SIZE
    patches_per_image: int | None = None
    augmentation_epochs: int = 2
    num_neighbours: int = DEFAULT_NEIGHBOURS
    temperature: float = DEFAULT_TEMPERATURE
    eval_resolution: str = "input"
    nn_backend: str = "auto"


def rare_class_first_indices(distribution: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of ``count`` patches of one image ([P, C] soft labels), rare classes first (module docstring, 1.)."""
    present = distribution > 0
    labelled = present.any(dim=1)
    count = min(count, int(labelled.sum()))
    patches_per_class = present.sum(dim=0).to(distribution.dtype)
    scores = (present * patches_per_class).sum(dim=1)
    scores = scores * torch.rand(len(scores), generator=generator).to(scores.device)
    scores[~labelled] = float("inf")
    return scores.topk(count, largest=False).indices


@torch.no_grad()
def build_memory(
    backbone: nn.Module,
    train_dataset: Dataset,
    num_classes: int,
    settings: common.EvalSettings,
    patches_per_image: int,
    augmentation_epochs: int = 2,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory features [M, D] (L2-normalised, fp32, CPU) and soft labels [M, C] from a raw (image, mask) dataset."""
    device = device or default_device()
    generator = torch.Generator().manual_seed(settings.seed)
    passes = max(1, augmentation_epochs)
    size = settings.image_size
    transform = SegmentationTransform(size, size, augment=augmentation_epochs > 0)
    features, labels = [], []
    for epoch in range(passes):
        dataset = PairedTransformDataset(train_dataset, transform, seed=settings.seed, epoch=epoch)
        name = f"memory pass {epoch + 1}/{passes}"
        for dense, masks in iterate_dense_batches(
            backbone, dataset, settings.batch_size, device, name, settings.num_workers, settings.use_rasa_head
        ):
            distribution = patch_label_distribution(torch.stack(masks), backbone.patch_size, num_classes)
            dense = F.normalize(dense.flatten(1, 2), dim=-1).cpu()
            distribution = distribution.flatten(1, 2)
            for image_features, image_labels in zip(dense, distribution):
                keep = rare_class_first_indices(image_labels, patches_per_image, generator)
                features.append(image_features[keep])
                labels.append(image_labels[keep])
    return torch.cat(features), torch.cat(labels)


class NearestNeighbours:
    """Exact top-k inner-product search over the memory: faiss ``IndexFlatIP`` or chunked torch matmul."""

    def __init__(self, memory: torch.Tensor, backend: str, device: torch.device, chunk_size: int = 4096):
        self.backend, self.chunk_size = backend, chunk_size
        if backend == "faiss":
            import faiss

            self.index = faiss.IndexFlatIP(memory.shape[1])
            self.index.add(memory.float().contiguous().numpy())
        elif backend == "torch":
            dtype = torch.float16 if device.type == "cuda" else torch.float32
            self.memory = memory.to(device, dtype)
        else:
            raise ValueError(f"nn backend {backend!r} is unknown; choose faiss or torch")

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Similarities [Q, k] (descending, fp32) and memory indices [Q, k] (int64), on the queries' device."""
        if self.backend == "faiss":
            sims, indices = self.index.search(queries.float().cpu().contiguous().numpy(), k)
            return torch.from_numpy(sims).to(queries.device), torch.from_numpy(indices).long().to(queries.device)
        sims, indices = [], []
        for start in range(0, len(queries), self.chunk_size):
            chunk = queries[start : start + self.chunk_size].to(self.memory.device, self.memory.dtype)
            top = (chunk @ self.memory.T).float().topk(k, dim=1)
            sims.append(top.values)
            indices.append(top.indices)
        return torch.cat(sims).to(queries.device), torch.cat(indices).to(queries.device)


def choose_nn_backend(requested: str, device: torch.device) -> str:
    """``auto``: faiss when importable and on CPU, else torch (exact either way)."""
    has_faiss = importlib.util.find_spec("faiss") is not None
    if requested == "faiss" and not has_faiss:
        raise ImportError("--nn-backend faiss needs faiss: pip install faiss-cpu (or faiss-gpu), or use torch")
    return requested if requested != "auto" else ("faiss" if has_faiss and device.type == "cpu" else "torch")


def retrieve_class_scores(
    queries: torch.Tensor,
    memory_labels: torch.Tensor,
    search: NearestNeighbours,
    k: int = DEFAULT_NEIGHBOURS,
    temperature: float = DEFAULT_TEMPERATURE,
) -> torch.Tensor:
    """[Q, D] query features → [Q, C] class scores: softmax(cos / τ) over the k nearest memory patches, applied to
    their soft labels (Balažević et al. 2023, eq. 1 with the open code's τ)."""
    k = min(k, len(memory_labels))
    sims, indices = search.search(F.normalize(queries.float(), dim=-1), k)
    weights = (sims / temperature).softmax(dim=1)
    neighbour_labels = memory_labels.to(queries.device)[indices]
    return torch.einsum("qk,qkc->qc", weights, neighbour_labels)


@torch.no_grad()
def evaluate_hummingbird(
    backbone: nn.Module,
    val_dataset: Dataset,
    memory_features: torch.Tensor,
    memory_labels: torch.Tensor,
    num_classes: int,
    settings: common.EvalSettings,
    hummingbird: HummingbirdSettings = HummingbirdSettings(),
    device: torch.device | None = None,
) -> dict:
    """Segments every val image by retrieval from the memory; returns :func:`segmentation_metrics`."""
    device = device or default_device()
    if hummingbird.eval_resolution not in ("input", "original"):
        raise ValueError(f"eval_resolution={hummingbird.eval_resolution!r}; choose input or original")
    search = NearestNeighbours(memory_features, choose_nn_backend(hummingbird.nn_backend, device), device)
    dataset = _val_pairs(val_dataset, settings, hummingbird)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    memory_labels = memory_labels.to(device)
    for dense, masks in iterate_dense_batches(
        backbone, dataset, settings.batch_size, device, "val", settings.num_workers, settings.use_rasa_head
    ):
        for prediction, mask in zip(predict_masks(dense, masks, memory_labels, search, hummingbird), masks):
            confusion += confusion_matrix(prediction, mask, num_classes)
    return segmentation_metrics(confusion)


def _val_pairs(val_dataset: Dataset, settings: common.EvalSettings, hummingbird: HummingbirdSettings) -> Dataset:
    mask_size = settings.image_size if hummingbird.eval_resolution == "input" else None
    return PairedTransformDataset(val_dataset, SegmentationTransform(settings.image_size, mask_size))


def predict_masks(
    dense: torch.Tensor,
    masks: list[torch.Tensor],
    memory_labels: torch.Tensor,
    search: "NearestNeighbours",
    hummingbird: HummingbirdSettings,
) -> list[torch.Tensor]:
    """Per image of a batch of dense features [B, h, w, D]: the retrieved class scores upsampled bilinearly to its
    mask's size and arg-maxed (a CPU label map)."""
    b, h, w, d = dense.shape
    scores = retrieve_class_scores(
        dense.reshape(-1, d), memory_labels, search, hummingbird.num_neighbours, hummingbird.temperature
    )
    scores = scores.reshape(b, h, w, memory_labels.shape[1]).permute(0, 3, 1, 2)
    return [
        F.interpolate(image_scores[None], size=tuple(mask.shape), mode="bilinear", align_corners=False)[0]
        .argmax(0)
        .cpu()
        for image_scores, mask in zip(scores, masks)
    ]


def save_prediction_examples(
    path: Path,
    backbone: nn.Module,
    val_dataset: Dataset,
    memory_features: torch.Tensor,
    memory_labels: torch.Tensor,
    settings: common.EvalSettings,
    hummingbird: HummingbirdSettings,
    count: int,
    device: torch.device,
) -> Path:
    """A PNG with one row per val image (the first ``count``): the input, its ground truth and the prediction under
    titled columns, enlarged to a readable size, label maps in a fixed palette (class 0 grey, ignored pixels black)
    with a legend of the classes shown (:func:`franca.eval.lib.pictures.label_grid`)."""
    search = NearestNeighbours(memory_features, choose_nn_backend(hummingbird.nn_backend, device), device)
    pairs = _val_pairs(val_dataset, settings, hummingbird)
    subset = Subset(pairs, range(min(count, len(pairs))))
    rows = []
    for dense, masks in iterate_dense_batches(
        backbone, subset, settings.batch_size, device, "examples", 0, settings.use_rasa_head
    ):
        predictions = predict_masks(dense, masks, memory_labels.to(device), search, hummingbird)
        rows += list(zip(masks, predictions))
    images = [denormalise(pairs[i][0]) for i in range(len(rows))]
    names = getattr(val_dataset, "classes", None)
    return atomic_write(path, png_bytes(label_grid(images, rows, names)))


def run_hummingbird(
    backbone: nn.Module,
    train_dataset: Dataset,
    val_dataset: Dataset,
    num_classes: int,
    settings: common.EvalSettings,
    hummingbird: HummingbirdSettings = HummingbirdSettings(),
    device: torch.device | None = None,
    examples_path: Path | None = None,
    examples: int = 0,
) -> dict:
    """Memory from ``train_dataset``, retrieval segmentation of ``val_dataset``: metrics and the settings used; with
    ``examples`` > 0 also the picture of :func:`save_prediction_examples` at ``examples_path``."""
    size, patch = settings.image_size, backbone.patch_size
    check_input_size(size, patch)
    passes = max(1, hummingbird.augmentation_epochs)
    patches_per_image = hummingbird.patches_per_image
    if patches_per_image is None:
        patches_per_image = max(1, hummingbird.memory_size // (len(train_dataset) * passes))
    patches_per_image = min(patches_per_image, (size[0] // patch) * (size[1] // patch))
    backend = choose_nn_backend(hummingbird.nn_backend, device or default_device())
    print(f"hummingbird: nearest neighbours with {backend} (exact inner product)", flush=True)
    hummingbird = replace(hummingbird, nn_backend=backend)
    start = time.perf_counter()
    memory_features, memory_labels = build_memory(
        backbone, train_dataset, num_classes, settings, patches_per_image, hummingbird.augmentation_epochs, device
    )
    memory_seconds = time.perf_counter() - start
    metrics = evaluate_hummingbird(
        backbone, val_dataset, memory_features, memory_labels, num_classes, settings, hummingbird, device
    )
    if examples > 0 and examples_path is not None:
        save_prediction_examples(
            examples_path, backbone, val_dataset, memory_features, memory_labels, settings, hummingbird, examples,
            device or default_device(),
        )  # fmt: skip
    used = {
        "input_size": list(size),
        "num_classes": num_classes,
        "memory_entries": len(memory_features),
        "memory_size_requested": hummingbird.memory_size,
        "patches_per_image": patches_per_image,
        "augmentation_epochs": hummingbird.augmentation_epochs,
        "num_neighbours": hummingbird.num_neighbours,
        "temperature": hummingbird.temperature,
        "eval_resolution": hummingbird.eval_resolution,
        "memory_seconds": memory_seconds,
        "total_seconds": time.perf_counter() - start,
    }
    return {**used, **metrics}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "franca.eval.hummingbird", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    common.add_eval_arguments(p, batch_size=32, old_size_names=("--input-size",), protocols=PROTOCOLS)
    p.add_argument("--train-dataset", required=True, help="memory images, e.g. VOC:root=R:split=trainaug")
    p.add_argument("--val-dataset", required=True, help="evaluated images, e.g. VOC:root=R:split=val")
    p.add_argument("--memory-size", type=int, default=DEFAULT_MEMORY_SIZE)
    p.add_argument("--patches-per-image", type=int, default=None, help="default: memory size / (images · passes)")
    p.add_argument("--augmentation-epochs", type=int, default=2, help="augmented passes; 0 = one plain pass")
    p.add_argument("--num-neighbours", type=int, default=DEFAULT_NEIGHBOURS)
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    p.add_argument("--eval-resolution", choices=("input", "original"), default="input")
    p.add_argument("--nn-backend", choices=("auto", "faiss", "torch"), default="auto")
    p.add_argument("--num-classes", type=int, default=None, help="default: from the dataset")
    p.add_argument(
        "--save-predictions",
        type=int,
        default=0,
        metavar="N",
        help="also write hummingbird_predictions.png: the first N val images, ground truth, prediction (default 0)",
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_eval_args(get_args_parser(), argv)
    from franca.data.loaders import make_dataset

    backbone = common.load_backbone_for_eval(args.weights, args.rasa_weights)
    settings = common.eval_settings(args, backbone, PROTOCOLS)
    train_dataset = make_dataset(args.train_dataset, decoding=settings.decoding)
    val_dataset = make_dataset(args.val_dataset, decoding=settings.decoding)
    num_classes = dataset_num_classes(train_dataset, args.num_classes)
    hummingbird = HummingbirdSettings(
        args.memory_size, args.patches_per_image, args.augmentation_epochs, args.num_neighbours, args.temperature,
        args.eval_resolution, args.nn_backend,
    )  # fmt: skip
    device = default_device()
    examples_path = Path(args.output_dir) / PREDICTIONS_FILE
    results = run_hummingbird(
        backbone, train_dataset, val_dataset, num_classes, settings, hummingbird, device, examples_path,
        args.save_predictions,
    )  # fmt: skip
    record = {
        "weights": args.weights,
        "rasa_weights": args.rasa_weights,
        "train_dataset": args.train_dataset,
        "val_dataset": args.val_dataset,
        "ignore_index": IGNORE_INDEX,
        "class_names": getattr(train_dataset, "classes", None),
        **results,
    }
    datasets = {"train": args.train_dataset, "val": args.val_dataset}
    common.write_results(args.output_dir, "hummingbird", record, common.run_metadata(args, settings, datasets))
    print(f"hummingbird: mIoU {results['mIoU']:.2f}  pixel accuracy {results['pixel_accuracy']:.2f}")
    return record


if __name__ == "__main__":
    main()
