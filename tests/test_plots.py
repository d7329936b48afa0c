"""The loss-curve picture: a grid readable at 100 % zoom, with each clustering loss's uniform value drawn."""

import json

import pytest

from franca.utils.plots import plot_loss_curves

pytest.importorskip("matplotlib")


def write_metrics(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_panels_form_a_grid_and_the_uniform_values_are_drawn(tmp_path, monkeypatch):
    import matplotlib.axes
    from PIL import Image

    records = [
        {"iteration": i, "total_loss": 30.0 - i, "dino_local_crops_loss": 19.0 - i, "dino_global_crops_loss": 4.8,
         "koleo_loss": 0.1, "ibot_loss": 12.0 - i, "dino_target_entropy_l0": 0.9, "ibot_target_entropy_l0": 0.8}
        for i in range(5)
    ]  # fmt: skip
    write_metrics(tmp_path / "training_metrics.json", [{"iteration": -1, "knn_top1_k20": 50.0}, *records])
    drawn = []
    original = matplotlib.axes.Axes.axhline

    def record_axhline(self, y=0, *args, **kwargs):
        drawn.append((y, kwargs.get("label")))
        return original(self, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", record_axhline)
    uniform = {"dino_local_crops_loss": 19.41, "dino_global_crops_loss": 4.85, "ibot_loss": 12.13}
    path = plot_loss_curves(tmp_path / "training_metrics.json", tmp_path / "loss_curves.png", uniform)
    width, height = Image.open(path).size
    assert (width, height) == (1320, 3 * 330)  # 7 panels, 3 a row, each 4.4 x 3.3 inches at 100 dpi
    lines = {y: label for y, label in drawn if label and label.startswith("uniform")}
    assert lines == {value: f"uniform {value:.2f} (nothing learnt)" for value in uniform.values()}
    assert len([label for _, label in drawn if label and label.startswith("uniform")]) == len(uniform)
