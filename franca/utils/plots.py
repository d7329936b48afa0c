"""Loss-curve pictures from ``training_metrics.json`` (matplotlib, from the ``log`` or ``dev`` extras).

The x-axis counts iterations completed, as the console, the checkpoints (``model_<done>.pth``) and the teacher exports
(``eval/training_<done>``) do: the record of 0-based ``iteration`` i is drawn at i + 1.
"""

import os
from functools import partial
from pathlib import Path

from franca.utils.atomic import atomic_write
from franca.utils.logging import read_metrics

LOSS_KEYS = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss")
DRIFT_KEYS = ("drift_cls_cos", "drift_patch_cos")
COLUMNS = 3


def plot_loss_curves(
    metrics_path: str | os.PathLike, out_path: str | os.PathLike, uniform: dict[str, float] | None = None
) -> Path:
    """A grid of panels (three a row, readable at 100 % zoom): one per loss term, with its uniform value (the loss
    when nothing is learnt, ``franca.train.progress``) as a dashed line where ``uniform`` gives one, the
    teacher-target entropy of each head's levels, and the drift from the pretrained features when the run has it;
    returns the PNG path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("the loss-curve PNG needs matplotlib: pip install 'franca[log]'") from err
    records = read_metrics(metrics_path)
    uniform = uniform or {}
    panels = [partial(_plot_key, key=k, uniform=uniform.get(k)) for k in LOSS_KEYS if any(k in r for r in records)]
    panels += [
        partial(_plot_target_entropies, head=h) for h in ("dino", "ibot") if _has(records, f"{h}_target_entropy_l0")
    ]
    if _has(records, DRIFT_KEYS[0]):
        panels.append(_plot_drift)
    rows = -(-len(panels) // COLUMNS)
    fig, axes = plt.subplots(rows, COLUMNS, figsize=(4.4 * COLUMNS, 3.3 * rows), squeeze=False)
    for ax, draw in zip(axes.flat, panels):
        draw(ax, records)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    out_path = atomic_write(out_path, lambda stream: fig.savefig(stream, format="png", dpi=100))
    plt.close(fig)
    return out_path


def _has(records: list[dict], key: str) -> bool:
    return any(key in r for r in records)


def _plot_key(ax, records: list[dict], key: str, uniform: float | None = None) -> None:
    points = [(iterations_done(r), r[key]) for r in records if key in r]
    ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.2)
    if uniform is not None:
        ax.axhline(uniform, color="black", ls="--", lw=0.8, label=f"uniform {uniform:.2f} (nothing learnt)")
        ax.legend(fontsize=8, loc="upper right")
    _style(ax, key)


def _plot_drift(ax, records: list[dict]) -> None:
    """Cosine of the teacher's CLS and mean-patch features to the pretrained backbone's (franca.train.drift)."""
    for key in DRIFT_KEYS:
        points = [(iterations_done(r), r[key]) for r in records if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.2, label=key.removeprefix("drift_"))
    ax.axhline(1.0, color="black", ls="--", lw=0.8)
    ax.legend(fontsize=8, loc="lower left")
    _style(ax, "drift from the pretrained features (cosine)")


def iterations_done(record: dict) -> int:
    """The iterations completed when a metrics record was written (its ``iteration`` is 0-based)."""
    return record["iteration"] + 1


def _style(ax, title: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("iterations done", fontsize=10)
    ax.tick_params(labelsize=9)
    ax.grid(alpha=0.3)


def _plot_target_entropies(ax, records: list[dict], head: str) -> None:
    """The teacher-target entropy of each level as a fraction of log K (franca.train.health); 1 = uniform targets."""
    level = 0
    while any(f"{head}_target_entropy_l{level}" in r for r in records):
        key = f"{head}_target_entropy_l{level}"
        points = [(iterations_done(r), r[key]) for r in records if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.0, label=f"level {level}")
        level += 1
    ax.axhline(1.0, color="black", ls="--", lw=0.8)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="lower left")
    _style(ax, f"{head} target entropy / log K")
