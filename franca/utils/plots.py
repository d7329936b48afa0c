"""Loss-curve pictures from ``training_metrics.json`` (matplotlib, from the ``log`` or ``dev`` extras)."""

import os
from pathlib import Path

from franca.utils.logging import read_metrics

LOSS_KEYS = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss")


def plot_loss_curves(metrics_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """One panel per loss term against the iteration; returns the PNG path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("the loss-curve PNG needs matplotlib: pip install 'franca[log]'") from err
    records = read_metrics(metrics_path)
    keys = [k for k in LOSS_KEYS if any(k in r for r in records)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["iteration"], r[key]) for r in records if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
