"""How the report reads each protocol's results file: the headline (the main number and its floors), tables shaped
like the data, and the settings that produced them (docs/evaluation.md, "One page to look at").

A view takes a results record (``results_eval_<protocol>.json``) and returns plain data; :mod:`franca.eval.report`
turns it into HTML. Every number shown comes from the record as written, so the page and the files agree.
"""

from dataclasses import dataclass, field

HEADLINE_K = "20"


@dataclass
class Table:
    """A caption, column names and rows of cells (text)."""

    caption: str
    columns: list[str]
    rows: list[list[str]]


@dataclass
class Headline:
    """The main number of a protocol (label and value), and its floors as (name, value) pairs."""

    label: str
    value: str
    floors: list[tuple[str, str]] = field(default_factory=list)


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


def number_keys(record: dict) -> list[str]:
    """The keys of a record that are numbers (``"10"``, ``"128"``): k values, feature dims; in numeric order."""
    return sorted((key for key in record if key.isdigit()), key=int)


def headline_k(by_k: dict) -> str:
    """The k the headline shows: 20 (the DINO protocol's usual report) when present, else the smallest."""
    keys = number_keys(by_k)
    return HEADLINE_K if HEADLINE_K in keys else keys[0]


# ----------------------------------------------------------------------------------------------------------- k-NN
def knn_headline(record: dict) -> Headline:
    k = headline_k(record)
    floors = [(name, percent(floor[k]["top1"])) for name, floor in record.get("floors", {}).items()]
    return Headline(f"k-NN top-1, k={k}", percent(record[k]["top1"]), floors)


def knn_tables(record: dict) -> list[Table]:
    floors = record.get("floors", {})
    columns = ["k", "model top-1", "top-5", *(f"{name} top-1" for name in floors)]
    rows = [
        [k, percent(record[k]["top1"]), percent(record[k]["top5"]), *(percent(f[k]["top1"]) for f in floors.values())]
        for k in number_keys(record)
    ]
    tables = [
        Table("weighted k-NN (T = {:g}) of the frozen feature".format(record.get("temperature", 0.07)), columns, rows)
    ]
    if floors:
        sources = [[name, floor.get("source", ""), str(floor.get("feature_dim", ""))] for name, floor in floors.items()]
        tables.append(Table("floors: the same vote without pretraining", ["floor", "what", "feature dim"], sources))
    return tables


# ----------------------------------------------------------------------------------------------------- Matryoshka
def matryoshka_headline(record: dict) -> Headline:
    knn = record["knn"]
    dims = number_keys(knn)
    k = headline_k(knn[dims[-1]])
    full, smallest = dims[-1], dims[0]
    middle = dims[len(dims) // 2]
    values = [f"d={d} {percent(knn[d][k]['top1'])}" for d in dict.fromkeys([full, middle, smallest])]
    return Headline(f"k-NN top-1 (k={k}) on the first d features", ", ".join(values))


def matryoshka_tables(record: dict) -> list[Table]:
    """Dimension × k (top-1), and the logistic regression per d when it ran."""
    knn, linear = record["knn"], record.get("linear")
    dims = sorted(number_keys(knn), key=int, reverse=True)
    ks = number_keys(knn[dims[0]])
    columns = ["d", *(f"k={k}" for k in ks), *(["log. regression"] if linear else [])]
    rows = [
        [d, *(percent(knn[d][k]["top1"]) for k in ks), *([percent(linear[d]["top1"])] if linear else [])] for d in dims
    ]
    return [Table("top-1 of the first d features (rows) by k (columns)", columns, rows)]


# ------------------------------------------------------------------------------------------------- segmentation
def segmentation_headline(record: dict) -> Headline:
    return Headline(f"mIoU (pixel accuracy {percent(record['pixel_accuracy'])})", percent(record["mIoU"]))


def segmentation_tables(record: dict) -> list[Table]:
    summary = Table(
        "segmentation of the val set",
        ["mIoU", "pixel accuracy", "classes evaluated", "pixels"],
        [[percent(record["mIoU"]), percent(record["pixel_accuracy"]), str(record.get("num_classes_evaluated", "")),
          str(record.get("num_pixels", ""))]],
    )  # fmt: skip
    names = record.get("class_names") or []
    per_class = [
        [names[c] if c < len(names) else str(c), percent(iou)]
        for c, iou in enumerate(record.get("per_class_IoU", []))
        if iou is not None
    ]
    return [summary, Table("IoU per class (classes present)", ["class", "IoU"], per_class)]


# ------------------------------------------------------------------------------------------ linear classifiers
def log_regression_headline(record: dict) -> Headline:
    if not record.get("complete", True):
        return Headline("logistic regression top-1 (stopped early)", percent(record.get("top1_before_refit")))
    return Headline(f"logistic regression top-1 (C = {record['best_c']:.3g})", percent(record["top1"]))


def log_regression_tables(record: dict) -> list[Table]:
    holdout = record.get("holdout_top1", {})
    rows = [[f"{float(c):.3g}", percent(value)] for c, value in holdout.items()]
    summary = Table(
        "validation",
        ["top-1", "top-5", "best C", "backend"],
        [[percent(record.get("top1")), percent(record.get("top5")), f"{record.get('best_c', float('nan')):.3g}",
          str(record.get("backend", ""))]],
    )  # fmt: skip
    return [summary, Table("holdout top-1 of each C fitted", ["C", "holdout top-1"], rows)]


def linear_headline(record: dict) -> Headline:
    best = record["best"]
    return Headline(f"linear probe top-1 ({best['name']})", percent(best["top1"]))


def linear_tables(record: dict) -> list[Table]:
    best = record["best"]
    rows = [[best["name"], percent(best["top1"]), percent(best["top5"])]]
    return [Table("best classifier on the val set", ["classifier", "top-1", "top-5"], rows)]


# ------------------------------------------------------------------------------------------------------------ PCA
def pca_headline(record: dict) -> Headline:
    shares = record.get("foreground_share", {})
    if not shares:
        return Headline("PCA pictures", f"{len(record.get('grids', []))} grid(s)")
    full = str(record["feature_dims"][0])
    return Headline("foreground patches (full features)", percent(100 * shares[full]))


def pca_tables(record: dict) -> list[Table]:
    shares = record.get("foreground_share", {})
    rows = [[d, percent(100 * share)] for d, share in sorted(shares.items(), key=lambda item: -int(item[0]))]
    return [Table("share of patches called foreground, by feature count", ["features", "foreground"], rows)]


# ----------------------------------------------------------------------------------------------------- dispatch
VIEWS = {
    "knn": (knn_headline, knn_tables),
    "matryoshka": (matryoshka_headline, matryoshka_tables),
    "hummingbird": (segmentation_headline, segmentation_tables),
    "linear_seg": (segmentation_headline, segmentation_tables),
    "log_regression": (log_regression_headline, log_regression_tables),
    "linear": (linear_headline, linear_tables),
    "pca": (pca_headline, pca_tables),
}
# Keys of a record that are results or bookkeeping, not settings.
NOT_SETTINGS = {
    "metadata", "weights", "rasa_weights", "floors", "knn", "linear", "best", "mIoU", "pixel_accuracy",
    "per_class_IoU", "num_classes_evaluated", "num_pixels", "top1", "top5", "holdout_top1", "foreground_share",
    "grids", "images", "train_dataset", "val_dataset", "top1_before_refit", "top5_before_refit", "c_values",
    "history", "classifiers", "results", "class_names",
}  # fmt: skip


def headline(name: str, record: dict) -> Headline:
    return VIEWS[name][0](record)


def tables(name: str, record: dict) -> list[Table]:
    return VIEWS[name][1](record)


def settings(record: dict) -> list[tuple[str, str]]:
    """The settings a protocol ran with: its scalar and short-list entries that are not results."""
    shown = []
    for key, value in record.items():
        if key in NOT_SETTINGS or key.isdigit():
            continue
        if isinstance(value, float):
            shown.append((key, f"{value:.4g}"))
        elif isinstance(value, (str, int, bool)) or value is None:
            shown.append((key, str(value)))
        elif isinstance(value, list) and len(value) <= 8 and all(not isinstance(v, (dict, list)) for v in value):
            shown.append((key, ", ".join(map(str, value))))
        elif isinstance(value, dict) and all(not isinstance(v, (dict, list)) for v in value.values()):
            shown.append((key, ", ".join(f"{k} {v}" for k, v in value.items())))
    return shown
