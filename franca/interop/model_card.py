"""The ``README.md`` model card of a transformers or timm folder written by ``python -m franca.export.hf``.

The card is a Hugging Face Hub card: YAML metadata (licence, library, pipeline tag) then Markdown sections for the
architecture, how to load and preprocess, the measured parity with franca, the RASA head, the training data and
recipe (from the weights registry for released weights, from the run's ``config.yaml`` for a run of ours), the
evaluation numbers of ``results_eval_*.json`` files, and the licence. Released Franca weights are research-only
(``license: other`` with ``LICENSE_MODEL`` copied beside the card); a user's own model carries the licence they name.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

import franca
from franca.hub.registry import TRAINING_DATA, ReleasedWeights
from franca.models.config import ViTConfig

RESEARCH_ONLY = "franca-research-only"
RESEARCH_ONLY_NAME = "franca-research-only-rail-ams"
LICENSE_FILE = "LICENSE_MODEL"
MAX_ROWS_PER_RESULT = 12
# The run settings a card lists, as (label, dotted key in the run's config.yaml).
RECIPE_KEYS = (
    ("training data", "train.dataset_path"),
    ("architecture", "student.arch"),
    ("epochs", "optim.epochs"),
    ("iterations per epoch", "train.OFFICIAL_EPOCH_LENGTH"),
    ("batch size per GPU", "train.batch_size_per_gpu"),
    ("base learning rate", "optim.base_lr"),
    ("global / local crop size", ("crops.global_crops_size", "crops.local_crops_size")),
    ("local crops", "crops.local_crops_number"),
    ("Matryoshka heads", "dino.MRL"),
    ("teacher targets", "train.centering"),
)
_ITERATION_FOLDER = re.compile(r"^(?:training|model)_0*(\d+)")


@dataclass(frozen=True)
class Licence:
    """The card's licence: an SPDX / Hub id, or :data:`RESEARCH_ONLY` (``license: other`` + ``LICENSE_MODEL``)."""

    id: str

    @property
    def research_only(self) -> bool:
        return self.id == RESEARCH_ONLY

    @property
    def hub_id(self) -> str:
        """The Hub's ``license`` value: ``other`` for the research-only licence, else the id itself."""
        return "other" if self.research_only else self.id

    def metadata(self) -> list[str]:
        if self.research_only:
            return ["license: other", f"license_name: {RESEARCH_ONLY_NAME}", f"license_link: {LICENSE_FILE}"]
        return [f"license: {self.hub_id}"]


@dataclass(frozen=True)
class Evaluation:
    """One ``results_eval_<name>.json``: its protocol, what it ran on, and its numbers."""

    name: str
    path: str
    datasets: dict
    sizes: dict
    weights: str
    rows: list[tuple[str, str]]


@dataclass(frozen=True)
class CardFacts:
    """Everything a card says, gathered by ``franca.export.hf``; ``parity`` is :func:`franca.export.hf.check_parity`'s
    record."""

    library: str
    config: ViTConfig
    parameters: int
    source: str
    licence: Licence
    usage: str
    parity: dict[str, float]
    release: ReleasedWeights | None = None
    recipe: list[tuple[str, str]] = field(default_factory=list)
    recipe_source: str = ""
    evaluations: list[Evaluation] = field(default_factory=list)
    has_rasa: bool = False
    preprocessing: str = ""


# ---------------------------------------------------------------------------------------------------------------------
# Gathering


def read_evaluations(results_dir: str | Path) -> list[Evaluation]:
    """Every ``results_eval_*.json`` under ``results_dir`` (sub-folders too, as ``franca.eval.report`` writes them),
    sorted by path; a folder without any is an error naming it."""
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--results-dir {root} is not a folder")
    files = sorted(root.rglob("results_eval_*.json"))
    if not files:
        raise FileNotFoundError(f"--results-dir {root} holds no results_eval_*.json (written by franca.eval.*)")
    evaluations = []
    for path in files:
        record = json.loads(path.read_text())
        metadata = record.get("metadata", {})
        weights = metadata.get("weights") or {}
        evaluations.append(
            Evaluation(
                name=path.stem.removeprefix("results_eval_"),
                path=str(path.relative_to(root)),
                datasets=metadata.get("datasets") or {},
                sizes=metadata.get("sizes") or {},
                weights=weights.get("source", "") if isinstance(weights, dict) else str(weights),
                rows=numeric_rows(record)[:MAX_ROWS_PER_RESULT],
            )
        )
    return evaluations


def numeric_rows(record: dict, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, formatted value) for every number of a results record, its metadata left out."""
    rows = []
    for key, value in record.items():
        if key == "metadata" and not prefix:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += numeric_rows(value, name + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append((name, f"{value:.4g}" if isinstance(value, float) else str(value)))
    return rows


def run_config_path(weights: str) -> Path | None:
    """The ``config.yaml`` of the training run a checkpoint comes from: ``<run>/eval/training_<it>/...`` (teacher
    exports) or ``<run>/checkpoints/...`` (training checkpoints); None for any other path."""
    path = Path(weights)
    if path.parent.name == "checkpoints":
        run_dir = path.parent.parent
    elif path.parent.name.startswith("training_") and path.parent.parent.name == "eval":
        run_dir = path.parent.parent.parent
    else:
        return None
    candidate = run_dir / "config.yaml"
    return candidate if candidate.is_file() else None


def recipe_of(config_path: Path, weights: str) -> list[tuple[str, str]]:
    """(label, value) rows of the run settings in :data:`RECIPE_KEYS`, and the iteration of the checkpoint."""
    cfg = OmegaConf.load(config_path)
    rows = []
    for label, keys in RECIPE_KEYS:
        keys = keys if isinstance(keys, tuple) else (keys,)
        values = [OmegaConf.select(cfg, key) for key in keys]
        if all(value is not None for value in values):
            rows.append((label, " / ".join(str(value) for value in values)))
    match = _ITERATION_FOLDER.match(Path(weights).parent.name) or _ITERATION_FOLDER.match(Path(weights).name)
    if match:
        rows.append(("iteration of these weights", match.group(1)))
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Rendering


def model_name(config: ViTConfig) -> str:
    """``ViT-B/14`` style name of a named architecture, else the shape."""
    short = {"vit_tiny": "Ti", "vit_small": "S", "vit_base": "B", "vit_large": "L", "vit_giant2": "g"}
    if config.arch in short:
        return f"ViT-{short[config.arch]}/{config.patch_size}"
    return f"ViT (width {config.embed_dim}, depth {config.depth}, {config.num_heads} heads)/{config.patch_size}"


def _architecture(facts: CardFacts) -> str:
    config = facts.config
    if config.ffn_layer == "mlp":
        ffn = f"GELU MLP, hidden {int(config.embed_dim * config.mlp_ratio)}"
    else:
        ffn = f"SwiGLU, hidden {(int(int(config.embed_dim * config.mlp_ratio) * 2 / 3) + 7) // 8 * 8}"
    grid = config.img_size // config.patch_size
    rows = [
        ("patch size", config.patch_size),
        ("width / depth / heads", f"{config.embed_dim} / {config.depth} / {config.num_heads}"),
        ("feed-forward", ffn),
        ("LayerScale", "yes" if config.layerscale else "no"),
        ("register tokens", config.num_register_tokens),
        ("position embeddings", f"learned, {grid}×{grid} grid ({config.img_size} px), resized for other sizes"),
        ("input channels", config.in_chans),
        ("parameters", f"{facts.parameters / 1e6:.1f} M"),
    ]
    return "| | |\n|---|---|\n" + "\n".join(f"| {label} | {value} |" for label, value in rows)


def _parity(facts: CardFacts) -> str:
    native, other = facts.parity["native_size"], facts.parity["other_size"]
    offset = facts.config.interpolate_offset
    how = "with `size=` and antialiasing" if facts.library == "timm" else "with `size=`"
    return (
        f"Checked when this folder was written: {facts.library} against franca on random images, float32. At the "
        f"native {native} px the largest difference of the CLS and patch tokens was "
        f"{facts.parity['native_cls']:.1e} / {facts.parity['native_patch']:.1e}. At other sizes {facts.library} "
        f"resizes the {facts.config.img_size // facts.config.patch_size}² position grid {how}, while franca (and the "
        f"original Franca code) uses a scale factor with a {offset} offset: at {other} px the difference was "
        f"{facts.parity['other_cls']:.1e} / {facts.parity['other_patch']:.1e}. For franca's exact features at any "
        "size, load this folder with franca (`franca.hub.load_backbone(folder)`; `franca_config.json` restores its "
        "settings)."
    )


def _training(facts: CardFacts) -> str:
    if facts.release is not None:
        release = facts.release
        return (
            f"Released weights `{release.name}` ({release.arch}) of the original Franca authors "
            f"({release.assets[0].tag} release of valeoai/Franca): trained on {TRAINING_DATA[release.name]}; the "
            "recipe is the paper's (arXiv 2507.14137)."
        )
    if not facts.recipe:
        return "The checkpoint does not record its training data or recipe."
    rows = "\n".join(f"| {label} | `{value}` |" for label, value in facts.recipe)
    return f"From the run's `{facts.recipe_source}`:\n\n| | |\n|---|---|\n{rows}"


def _evaluations(facts: CardFacts) -> str:
    if not facts.evaluations:
        return "No evaluation results were given (`--results-dir`)."
    parts = []
    for ev in facts.evaluations:
        datasets = ", ".join(f"{k}: `{v}`" for k, v in ev.datasets.items()) or "not recorded"
        sizes = ev.sizes.get("image_size")
        rows = "\n".join(f"| {key} | {value} |" for key, value in ev.rows)
        parts.append(
            f"### {ev.name} (`{ev.path}`)\n\nDatasets: {datasets}. Image size: {sizes or 'not recorded'}. Weights "
            f"evaluated: `{ev.weights or 'not recorded'}`.\n\n| value | |\n|---|---|\n{rows}"
        )
    return "\n\n".join(parts)


def _licence(facts: CardFacts) -> str:
    if facts.licence.research_only:
        return (
            "These are (or derive from) the weights released by the Franca authors, under their research-only model "
            f'licence ("Franca RESEARCH-ONLY RAIL-AMS"): see `{LICENSE_FILE}` beside this card. The franca code '
            "that wrote this folder is Apache-2.0."
        )
    return f"`{facts.licence.id}`, as chosen by the model's owner when exporting."


def _rasa(facts: CardFacts) -> str:
    return (
        "`rasa_head.safetensors` holds the RASA head (post-hoc removal of patch-position information; paper "
        "arXiv 2507.14137): the original keys `pre_pos_layers.{j}.weight` and `pos_pred.weight`, and "
        "`folded_matrix`, the whole head as one D×D matrix M. Debiased patch tokens, in two lines:\n\n"
        "```python\nfrom safetensors.torch import load_file\n\n"
        'patches_rasa = patches @ load_file("rasa_head.safetensors")["folded_matrix"].T\n```\n\n'
        'With franca: `load_backbone(folder, rasa_weights=f"{folder}/rasa_head.safetensors")`, then '
        '`forward_features(x, use_rasa_head=True)["patch_token_rasa"]`.'
    )


def render_card(facts: CardFacts) -> str:
    """The whole ``README.md``."""
    metadata = [
        *facts.licence.metadata(),
        f"library_name: {facts.library}",
        "pipeline_tag: image-feature-extraction",
        "tags:",
        "- franca",
        "- vision",
        "- self-supervised-learning",
        "- feature-extraction",
    ]
    origin = f"the released weights `{facts.release.name}`" if facts.release is not None else f"`{facts.source}`"
    sections = [
        ("Architecture", _architecture(facts)),
        ("Use", f"```python\n{facts.usage}\n```\n\n{facts.preprocessing}"),
        ("Parity with franca", _parity(facts)),
        *((("RASA head", _rasa(facts)),) if facts.has_rasa else ()),
        ("Training", _training(facts)),
        ("Evaluation", _evaluations(facts)),
        ("Licence", _licence(facts)),
        (
            "Citation",
            "Franca: Nested Matryoshka Clustering for Scalable Visual Representation Learning, arXiv 2507.14137.",
        ),
    ]
    body = "\n\n".join(f"## {title}\n\n{text}" for title, text in sections)
    return (
        "---\n" + "\n".join(metadata) + "\n---\n\n"
        f"# Franca {model_name(facts.config)} ({facts.library})\n\n"
        f"A Franca vision backbone (DINOv2-style self-supervised ViT; arXiv 2507.14137) from {origin}, written by "
        f"`python -m franca.export.hf` (franca {franca.__version__}).\n\n{body}\n"
    )
