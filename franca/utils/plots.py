"""Loss-curve pictures from ``training_metrics.json`` (matplotlib, from the ``log`` or ``dev`` extras).

The x-axis counts iterations completed, as the console, the checkpoints (``model_<done>.pth``) and the teacher exports
(``eval/training_<done>``) do: the record of 0-based ``iteration`` i is drawn at i + 1.
"""

import os
from pathlib import Path

from franca.utils.atomic import atomic_write
from franca.utils.logging import read_metrics

LOSS_KEYS = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss")


def plot_loss_curves(metrics_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """One panel per loss term against the iterations completed; returns the PNG path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("the loss-curve PNG needs matplotlib: pip install 'franca[log]'") from err
    records = read_metrics(metrics_path)
    keys = [k for k in LOSS_KEYS if any(k in r for r in records)]
    heads = [h for h in ("dino", "ibot") if any(f"{h}_target_entropy_l0" in r for r in records)]
    n_panels = len(keys) + len(heads)
    fig, axes = plt.subplots(1, n_panels, figsize=(3.2 * n_panels, 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(iterations_done(r), r[key]) for r in records if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.2)
        _style(ax, key)
    for ax, head in zip(axes[0][len(keys) :], heads):
        _plot_target_entropies(ax, records, head)
    fig.tight_layout()
    out_path = atomic_write(out_path, lambda stream: fig.savefig(stream, format="png", dpi=110))
    plt.close(fig)
    return out_path


def iterations_done(record: dict) -> int:
    """The iterations completed when a metrics record was written (its ``iteration`` is 0-based)."""
    return record["iteration"] + 1


def _style(ax, title: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("iterations done", fontsize=8)
    ax.tick_params(labelsize=7)
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
    ax.legend(fontsize=6, loc="lower left")
    _style(ax, f"{head} target entropy / log K")
