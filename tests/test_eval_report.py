"""The HTML evaluation report: it runs the chosen protocols on a tiny model, embeds every picture, and shows a
failing protocol's error without losing the others."""

import base64
import io
import os
from html.parser import HTMLParser

import pytest
import torch
from eval_data import make_photo_folders, make_tile_segfolder
from PIL import Image

from franca.eval import report
from franca.models.vision_transformer import build_vit

LOADER = ["--batch-size", "8", "--num-workers", "0"]


class PageParser(HTMLParser):
    """Collects the image sources, section ids and error blocks of the page (and fails on unbalanced tags)."""

    def __init__(self):
        super().__init__()
        self.images, self.sections, self.errors, self.stack = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
            return
        if tag in ("meta",):
            return
        self.stack.append(tag)
        if tag == "h2":
            self.sections.append(attrs["id"])
        if tag == "pre" and attrs.get("class") == "error":
            self.errors.append(len(self.sections))

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> after {self.stack[-3:]}"
        self.stack.pop()


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


def test_the_report_runs_each_protocol_and_embeds_every_picture(tiny_export, tmp_path):
    train, val = make_photo_folders(tmp_path / "photos", n_train=4, n_val=2)
    seg = make_tile_segfolder(tmp_path / "seg", tile=16, n_train=2, n_val=2)
    out = tmp_path / "report"
    argv = ["--weights", tiny_export, "--output-dir", str(out), *LOADER, "--train-dataset", train]
    argv += ["--val-dataset", val, "--seg-train-dataset", f"SegFolder:root={seg}:split=train"]
    argv += ["--seg-val-dataset", f"SegFolder:root={seg}:split=val", "--predictions", "2"]
    path = report.main(argv)
    page = parse(path)
    assert page.sections == ["knn", "matryoshka", "hummingbird", "pca"] and page.errors == []
    assert len(page.images) >= 3  # the Matryoshka curve, HummingBird predictions, at least one PCA grid
    for source in page.images:
        assert source.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).verify()
    predictions = Image.open(out / "hummingbird" / "hummingbird_predictions.png")
    assert predictions.size == (3 * 28, 2 * 28)  # image | ground truth | prediction, one row per val image
    text = path.read_text()
    assert "mIoU" in text and "results" not in page.sections


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
    assert "missing.png" in (out / "report.html").read_text() and "top1" in (out / "report.html").read_text()
    assert "pca failed" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [([], "no protocol can run"), (["--protocols", "hummingbird"], "needs --seg-train-dataset")],
)
def test_missing_datasets_are_named(tiny_export, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        report.main(["--weights", tiny_export, "--output-dir", str(tmp_path), *extra])
    assert message in capsys.readouterr().err
