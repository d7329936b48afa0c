"""The HTML evaluation report: it runs the chosen protocols on a tiny model, puts a headline box whose numbers are
those of the results files, shows pictures at a readable size, renders in a real browser, and shows a failing
protocol's error without losing the others."""

import base64
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from eval_data import make_photo_folders, make_tile_segfolder
from PIL import Image

from franca.eval import report
from franca.eval.lib.report_views import headline
from franca.models.vision_transformer import build_vit

LOADER = ["--batch-size", "8", "--num-workers", "0"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class PageParser(HTMLParser):
    """Collects the image sources, section ids, error blocks and the headline box's cells (text per row) of the page
    (and fails on unbalanced tags)."""

    def __init__(self):
        super().__init__()
        self.images, self.sections, self.errors, self.stack = [], [], [], []
        self.headline_rows, self.in_headline, self.commands = [], False, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("img", "br"):
            self.images += [attrs["src"]] if tag == "img" else []
            return
        if tag in ("meta",):
            return
        self.stack.append(tag)
        if tag == "h2":
            self.sections.append(attrs["id"])
        if tag == "pre" and attrs.get("class") == "error":
            self.errors.append(len(self.sections))
        if tag == "table" and attrs.get("class") == "headline":
            self.in_headline = True
        if tag == "tr" and self.in_headline:
            self.headline_rows.append("")

    def handle_data(self, data):
        if self.in_headline and self.headline_rows:
            self.headline_rows[-1] += data + " "
        if self.stack and self.stack[-1] == "pre" and not self.sections:
            self.commands.append(data)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> after {self.stack[-3:]}"
        self.stack.pop()
        if tag == "table":
            self.in_headline = False


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = build_vit("vit_tiny", depth=1, patch_size=4, img_size=28)
    path = tmp_path_factory.mktemp("export") / "teacher_checkpoint.pth"
    torch.save({"teacher": {"backbone." + k: v for k, v in model.state_dict().items()}}, path)
    return str(path)


def parse(path) -> PageParser:
    page = PageParser()
    page.feed(path.read_text())
    assert page.stack == [], f"unclosed tags {page.stack}"
    return page


@pytest.fixture(scope="module")
def full_report(tiny_export, tmp_path_factory):
    """A report of the four default protocols on photos and a segmentation folder."""
    root = tmp_path_factory.mktemp("full")
    train, val = make_photo_folders(root / "photos", n_train=4, n_val=2)
    seg = make_tile_segfolder(root / "seg", tile=16, n_train=2, n_val=2)
    out = root / "report"
    argv = ["--weights", tiny_export, "--output-dir", str(out), *LOADER, "--train-dataset", train]
    argv += ["--val-dataset", val, "--seg-train-dataset", f"SegFolder:root={seg}:split=train"]
    argv += ["--seg-val-dataset", f"SegFolder:root={seg}:split=val", "--predictions", "2"]
    return report.main(argv), out, argv


@pytest.mark.slow
def test_the_report_runs_each_protocol_and_embeds_every_picture(full_report):
    path, out, argv = full_report
    page = parse(path)
    assert page.sections == ["knn", "matryoshka", "hummingbird", "pca"] and page.errors == []
    assert len(page.images) >= 3  # the Matryoshka curve, HummingBird predictions, at least one PCA grid
    for source in page.images:
        assert source.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).verify()
    text = path.read_text()
    assert "mIoU" in text and "took " in text and "took 0:00:00" not in text
    assert page.commands and argv[-1] in page.commands[0] and "python -m franca.eval.report" in page.commands[0]


@pytest.mark.slow
def test_the_headline_box_shows_the_results_files_numbers(full_report):
    path, out, _ = full_report
    page = parse(path)
    assert len(page.headline_rows) == 1 + 4  # header and one row per protocol
    knn = json.loads((out / "knn" / "results_eval_knn.json").read_text())
    row = page.headline_rows[1]
    assert f"{knn['20']['top1']:.2f}%" in row  # k = 20, the DINO protocol's usual report
    for name in ("random-init", "pixels"):  # the floors, on by default in the report
        assert f"{name} {knn['floors'][name]['20']['top1']:.2f}%" in row
    assert "train: ImageFolder:root=" in row and "28x28 (the checkpoint's img_size), resize 32" in row
    seg = json.loads((out / "hummingbird" / "results_eval_hummingbird.json").read_text())
    assert f"{seg['mIoU']:.2f}%" in page.headline_rows[3]
    for number, name in enumerate(("knn", "matryoshka", "hummingbird", "pca"), start=1):
        record = json.loads((out / name / f"results_eval_{name}.json").read_text())
        assert headline(name, record).value in page.headline_rows[number]


def test_pictures_are_written_at_a_readable_size(full_report):
    _, out, _ = full_report
    strip = np.asarray(Image.open(out / "hummingbird" / "hummingbird_predictions.png").convert("RGB"))
    factor = 5  # 28 px panels enlarged 5x (nearest) to 140 >= 128 px
    assert strip.shape[0] > 2 * 28 * factor and strip.shape[1] >= 3 * 28 * factor
    pca = json.loads((out / "pca" / "results_eval_pca.json").read_text())
    assert pca["panel_scale"] == factor
    grid = Image.open(out / "pca" / pca["grids"][0])
    assert grid.size[0] >= len(pca["columns"]) * 28 * factor and grid.size[1] > 2 * 28 * factor


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium)")
@pytest.mark.slow
def test_the_page_renders_in_a_real_browser(full_report, tmp_path):
    """Debian's Chromium renders the page headless to a PNG: not blank, the headline box in its light blue-grey."""
    path, _, _ = full_report
    shot = tmp_path / "report.png"
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,900",
        f"file://{path}",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (900, 1200, 3)
    assert pixels.std() > 10  # text, tables and pictures, not an empty page
    assert (np.abs(pixels.astype(int) - (0xF3, 0xF5, 0xF7)).sum(axis=-1) == 0).mean() > 0.02  # the headline box


def test_a_failing_protocol_is_shown_and_the_others_still_run(tiny_export, tmp_path, capsys):
    train, val = make_photo_folders(tmp_path / "photos", n_train=4, n_val=2)
    out = tmp_path / "report"
    argv = ["--weights", tiny_export, "--output-dir", str(out), *LOADER, "--train-dataset", train]
    argv += ["--val-dataset", val, "--protocols", "knn,pca", "--images", str(tmp_path / "missing.png")]
    leftover = out / "pca" / "pca_grid_000.png"  # a picture of an earlier report in the same folder
    leftover.parent.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(leftover)
    os.utime(leftover, (1e9, 1e9))
    page = parse(report.main(argv))
    assert page.sections == ["knn", "pca"] and page.errors == [2]  # pca failed, knn's results are still shown
    assert page.images == []  # the earlier picture is not shown as this run's
    assert "missing.png" in (out / "report.html").read_text() and "model top-1" in (out / "report.html").read_text()
    assert "pca failed" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [([], "no protocol can run"), (["--protocols", "hummingbird"], "needs --seg-train-dataset")],
)
def test_missing_datasets_are_named(tiny_export, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        report.main(["--weights", tiny_export, "--output-dir", str(tmp_path), *extra])
    assert message in capsys.readouterr().err
