"""A pictures-first evaluation report: run a chosen set of protocols and write one self-contained HTML page that a
researcher reads in ten seconds (docs/evaluation.md, "One page to look at").

``python -m franca.eval.report --weights W --output-dir D [--train-dataset S --val-dataset S] [--seg-train-dataset S
--seg-val-dataset S] [--images F ... | --pca-dataset S] [--protocols knn,matryoshka,pca,hummingbird]``

Each protocol runs as its own command (``franca.eval.<protocol>``) into ``D/<protocol>/`` with the shared flags
(weights, RASA head, image size, loader, seed, decoding) passed on, so its results file is the one the command would
write; the k-NN runs with ``--baselines random-init,pixels``. ``D/report.html`` then shows, from the top: the model
(architecture, trained size, stored decoding), a headline box (per protocol its main number, its floors, the
datasets and the image size), the full command, and per protocol its time, tables shaped like its data
(:mod:`franca.eval.lib.report_views`: k × model and floors, Matryoshka dimension × k, mIoU and IoU per class, ...), its
pictures (the Matryoshka curve, the PCA grids, HummingBird predictions beside the ground truth, enlarged and
labelled by the commands), its settings and the metadata block. Every picture is embedded as a data URI: the page
is one file to open, mail or archive. A protocol that fails is shown with its error and the others still run. By
default (``--protocols auto``) every cheap protocol the given datasets allow runs: knn and matryoshka with the
classification datasets, hummingbird with the segmentation datasets, pca with images (or the first val images).
"""

import argparse
import base64
import html
import importlib
import json
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from franca.eval.lib import common
from franca.eval.lib.floors import BASELINES
from franca.eval.lib.report_views import Table, headline, settings, tables
from franca.utils.atomic import atomic_write

CLASSIFICATION = ("knn", "matryoshka", "linear", "log_regression")
SEGMENTATION = ("hummingbird", "linear_seg")
PROTOCOLS = (*CLASSIFICATION, *SEGMENTATION, "pca")
AUTO_PROTOCOLS = ("knn", "matryoshka", "hummingbird", "pca")
REPORT_FILE = "report.html"


@dataclass
class ProtocolRun:
    """One protocol's outcome: its folder, results record (None if it failed), pictures and error text."""

    name: str
    folder: Path
    record: dict | None = None
    pictures: list[Path] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "franca.eval.report", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--weights", required=True, help="hub name (franca_vitb14[:IN21K]) or checkpoint path / URL")
    p.add_argument("--rasa-weights", default=None, help="RASA head file, passed to every protocol")
    p.add_argument("--output-dir", required=True, help="folder of report.html and one sub-folder per protocol")
    p.add_argument(
        "--protocols",
        default="auto",
        help=f"comma-separated, from {', '.join(PROTOCOLS)}; auto = {', '.join(AUTO_PROTOCOLS)} where datasets allow",
    )
    p.add_argument("--train-dataset", default=None, help="labelled classification train set (knn, matryoshka, ...)")
    p.add_argument("--val-dataset", default=None, help="labelled classification val set")
    p.add_argument("--seg-train-dataset", default=None, help="segmentation train set (hummingbird memory, linear_seg)")
    p.add_argument("--seg-val-dataset", default=None, help="segmentation val set")
    p.add_argument("--images", nargs="+", default=None, help="image files for the PCA pictures")
    p.add_argument("--pca-dataset", default=None, help="dataset for the PCA pictures (default: the val set)")
    p.add_argument("--image-size", type=int, nargs="+", default=None, help="S or H W (default: the trained size)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=common.default_num_workers())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha-background", default=None, help="colour under transparent pixels (default: the model's)")
    p.add_argument("--image-max-value", default=None, help="16/32-bit images' maximum (default: the model's)")
    p.add_argument("--predictions", type=int, default=4, help="HummingBird val images pictured (default 4)")
    p.add_argument(
        "--baselines",
        default=",".join(BASELINES),
        help=f"floors the k-NN puts beside the model (default {','.join(BASELINES)}; '' for none)",
    )
    return p


def choose_protocols(args: argparse.Namespace) -> list[str]:
    """The protocols to run, checked against the datasets given (a clear error names what is missing)."""
    classification = args.train_dataset and args.val_dataset
    segmentation = args.seg_train_dataset and args.seg_val_dataset
    pictures = args.images or args.pca_dataset or args.val_dataset or args.seg_val_dataset
    if args.protocols == "auto":
        chosen = [
            name
            for name in AUTO_PROTOCOLS
            if (name in CLASSIFICATION and classification)
            or (name in SEGMENTATION and segmentation)
            or (name == "pca" and pictures)
        ]
        if not chosen:
            raise ValueError(
                "no protocol can run: give --train-dataset and --val-dataset (classification), --seg-train-dataset "
                "and --seg-val-dataset (segmentation), or --images (PCA pictures)"
            )
        return chosen
    chosen = [name.strip() for name in args.protocols.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in PROTOCOLS]
    if unknown:
        raise ValueError(f"--protocols: unknown {unknown}; choose from {', '.join(PROTOCOLS)}")
    for name in chosen:
        if name in CLASSIFICATION and not classification:
            raise ValueError(f"--protocols {name} needs --train-dataset and --val-dataset")
        if name in SEGMENTATION and not segmentation:
            raise ValueError(f"--protocols {name} needs --seg-train-dataset and --seg-val-dataset")
        if name == "pca" and not pictures:
            raise ValueError("--protocols pca needs --images, --pca-dataset or a val dataset")
    return chosen


def protocol_argv(name: str, args: argparse.Namespace, folder: Path) -> list[str]:
    """The command line of one protocol: the shared flags plus its datasets."""
    argv = ["--weights", args.weights, "--output-dir", str(folder), "--seed", str(args.seed)]
    argv += ["--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers)]
    for flag, value in (("--alpha-background", args.alpha_background), ("--image-max-value", args.image_max_value)):
        argv += [flag, value] if value is not None else []
    if args.rasa_weights:
        argv += ["--rasa-weights", args.rasa_weights]
    if args.image_size:
        argv += ["--image-size", *map(str, args.image_size)]
    if name in CLASSIFICATION:
        argv += ["--train-dataset", args.train_dataset, "--val-dataset", args.val_dataset]
        if name == "knn" and args.baselines:
            argv += ["--baselines", args.baselines]
    elif name in SEGMENTATION:
        argv += ["--train-dataset", args.seg_train_dataset, "--val-dataset", args.seg_val_dataset]
        if name == "hummingbird":
            argv += ["--save-predictions", str(args.predictions)]
    elif args.images:
        argv += ["--images", *args.images]
    else:
        argv += ["--dataset", args.pca_dataset or args.val_dataset or args.seg_val_dataset]
    return argv


def run_protocol(name: str, args: argparse.Namespace, out_dir: Path) -> ProtocolRun:
    """Run ``franca.eval.<name>`` into ``out_dir/<name>``; a failure is recorded, not raised."""
    run = ProtocolRun(name, out_dir / name)
    start, started_at = time.perf_counter(), time.time()
    try:
        module = importlib.import_module(f"franca.eval.{name}")
        module.main(protocol_argv(name, args, run.folder))
        run.record = json.loads((run.folder / f"results_eval_{name}.json").read_text())
    except (Exception, SystemExit) as err:  # argparse errors exit: show them in the page too
        run.error = "".join(traceback.format_exception_only(type(err), err)).strip()
        print(f"report: {name} failed: {run.error}", file=sys.stderr, flush=True)
    run.seconds = time.perf_counter() - start
    # only this run's pictures: an earlier report may have left others in the same folder
    pictures = run.folder.glob("*.png") if run.folder.is_dir() else []
    run.pictures = sorted(p for p in pictures if p.stat().st_mtime >= started_at - 1.0)
    return run


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def format_seconds(seconds: float) -> str:
    """``0.4 s``, ``12.3 s``, ``4 min 05 s``: a protocol's time, readable at any length."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def describe_sizes(metadata: dict) -> str:
    """``28x28 (the checkpoint's img_size), resize 32`` from a results file's metadata."""
    sizes = metadata.get("sizes") or {}
    if "image_size" not in sizes:
        return ""
    height, width = sizes["image_size"]
    text = f"{height}x{width} ({sizes.get('image_size_from', '')})"
    return text + (f", resize {sizes['resize_size']}" if "resize_size" in sizes else "")


def describe_datasets(metadata: dict) -> str:
    datasets = metadata.get("datasets") or {}
    return "; ".join(
        f"{role}: {value if isinstance(value, str) else f'{len(value)} files'}" for role, value in datasets.items()
    )


def describe_model(backbone) -> str:
    """One line on the model: architecture, trained size, the decoding it records."""
    decoding = backbone.input_decoding
    stored = (
        f"alpha background {decoding.get('alpha_background')}, image max value {decoding.get('image_max_value')}"
        if decoding
        else "not recorded (white, each image's range)"
    )
    return (
        f"ViT: width {backbone.embed_dim}, depth {backbone.n_blocks}, {backbone.num_heads} heads, patch "
        f"{backbone.patch_size}, trained at {backbone.img_size} px; decoding {stored}"
    )


def render_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(column)}</th>" for column in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in table.rows)
    return f"<table><caption>{html.escape(table.caption)}</caption><tr>{head}</tr>{body}</table>"


def render_headline(runs: list[ProtocolRun]) -> str:
    """The box at the top: per protocol its main number, its floors, datasets and sizes."""
    rows = []
    for run in runs:
        name = f"<a href='#{run.name}'>{html.escape(run.name)}</a>"
        if run.error:
            rows.append(f"<tr><td>{name}</td><td class='error' colspan='4'>failed: see below</td></tr>")
            continue
        top = headline(run.name, run.record)
        floors = ", ".join(f"{html.escape(label)} {html.escape(value)}" for label, value in top.floors)
        metadata = run.record.get("metadata", {})
        rows.append(
            f"<tr><td>{name}</td><td>{html.escape(top.label)}<br><b class='value'>{html.escape(top.value)}</b></td>"
            f"<td>{floors}</td><td>{html.escape(describe_datasets(metadata))}</td>"
            f"<td>{html.escape(describe_sizes(metadata))}</td></tr>"
        )
    head = "<tr><th>protocol</th><th>result</th><th>floors</th><th>data</th><th>image size</th></tr>"
    return f"<table class='headline'>{head}{''.join(rows)}</table>"


def render_section(run: ProtocolRun) -> str:
    title = f"<h2 id='{run.name}'>{html.escape(run.name)} <small>took {format_seconds(run.seconds)}</small></h2>"
    if run.error:
        return f"<section>{title}<pre class='error'>{html.escape(run.error)}</pre></section>"
    shown = "".join(render_table(table) for table in tables(run.name, run.record))
    pictures = "".join(
        f"<figure><img src='{data_uri(p)}' alt='{html.escape(p.name)}'><figcaption>{html.escape(p.name)}"
        "</figcaption></figure>"
        for p in run.pictures
    )
    used = Table("settings", ["setting", "value"], [list(row) for row in settings(run.record)])
    metadata = html.escape(json.dumps(run.record.get("metadata", {}), indent=2))
    return (
        f"<section>{title}{shown}{pictures}{render_table(used)}"
        f"<details><summary>metadata</summary><pre>{metadata}</pre></details></section>"
    )


STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;background:#fff}"
    "table{border-collapse:collapse;margin:0.8em 0}caption{text-align:left;font-weight:bold;padding:4px 0}"
    "td,th{border-bottom:1px solid #ddd;padding:3px 12px;text-align:left;vertical-align:top}"
    "table.headline{width:100%;background:#f3f5f7;border:1px solid #c8d0d8}table.headline .value{font-size:1.4em}"
    "img{max-width:100%;image-rendering:pixelated}figure{margin:1em 0}figcaption{color:#666;font-size:0.85em}"
    "pre{background:#f6f6f6;padding:8px;white-space:pre-wrap;overflow-wrap:anywhere}.error{color:#a00}"
    "h2 small{font-weight:normal;color:#666;font-size:0.6em}"
)


def render_report(runs: list[ProtocolRun], args: argparse.Namespace, command: str, model: str) -> str:
    """The whole page: the model, the headline box, the command, then each protocol's section."""
    sections = "".join(render_section(run) for run in runs)
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>franca evaluation report</title>"
        f"<style>{STYLE}</style></head><body><h1>Evaluation report</h1>"
        f"<p>weights <code>{html.escape(args.weights)}</code><br>{html.escape(model)}</p>"
        f"{render_headline(runs)}<pre class='command'>{html.escape(command)}</pre>{sections}</body></html>\n"
    )


def main(argv: list[str] | None = None) -> Path:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        protocols = choose_protocols(args)
    except ValueError as err:
        parser.error(str(err))
    out_dir = Path(args.output_dir)
    command = shlex.join(["python", "-m", "franca.eval.report", *(sys.argv[1:] if argv is None else argv)])
    try:
        model = describe_model(common.load_backbone_for_eval(args.weights, args.rasa_weights))
    except (OSError, ValueError, RuntimeError) as err:  # every protocol will fail and show why; say it here too
        model = f"the backbone could not be loaded: {err}"
    runs = []
    for index, name in enumerate(protocols, start=1):
        print(f"report: [{index}/{len(protocols)}] {name}", flush=True)
        runs.append(run_protocol(name, args, out_dir))
    path = atomic_write(out_dir / REPORT_FILE, render_report(runs, args, command, model))
    failed = [run.name for run in runs if run.error]
    print(f"report: {path}" + (f" ({len(failed)} failed: {', '.join(failed)})" if failed else ""), flush=True)
    return path


if __name__ == "__main__":
    main()
