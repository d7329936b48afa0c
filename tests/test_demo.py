"""The feature-extraction demo: shapes printed and a PCA picture written, on a real photo."""

import pytest
from PIL import Image

from franca import demo
from franca.eval.lib.pictures import GAP


@pytest.mark.slow
def test_demo_prints_shapes_and_writes_a_pca_picture(tmp_path, capsys):
    out = tmp_path / "pca.png"
    shapes = demo.main(["--size", "112", "--out", str(out)])
    assert shapes["x_norm_clstoken"] == (1, 768)
    assert shapes["x_norm_patchtokens"] == (1, 64, 768)
    width, height = Image.open(out).size  # photo and PCA side by side, each enlarged 2x to 224 px, titled
    assert width >= 2 * 224 + GAP and 224 < height < 224 + 40
    assert "x_norm_patchtokens" in capsys.readouterr().out
