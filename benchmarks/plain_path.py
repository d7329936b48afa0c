"""CPU inference speed of our ViT's plain path (learned position embeddings) in the working tree against a git
revision, in one run: did adding RoPE (issue #25) slow the path every Franca and DINOv2 model takes?

    PYTHONPATH=. python benchmarks/plain_path.py --baseline <rev> [--arch vit_base --image-size 224 --batch 8
        --rounds 7 --iters 5 --threads 2] [--out benchmarks/results/plain_path_cpu.json]

The baseline's ``franca`` package is extracted with ``git archive <rev> franca`` into a temporary folder. Each round
times both trees in fresh worker processes, alternating which goes first, with the same architecture, seed (so the
same random weights) and input. Reported (working tree / baseline): the median of the per-round ratios (each round
runs both trees back to back, so slow phases of a shared machine hit both), the ratio of the best rounds, the ratio
of the medians; and whether both trees gave bit-identical outputs (the plain path must compute the same numbers).
"""

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """Time ``args.iters`` forwards of the tree on PYTHONPATH; print one JSON line (img/s and an output checksum)."""
    import torch

    from franca.models import build_vit

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_vit(args.arch, img_size=args.image_size).eval()
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.forward_features(x)["x_prenorm"]
        start = time.perf_counter()
        for _ in range(args.iters):
            model.forward_features(x)
        seconds = time.perf_counter() - start
    checksum = float(out.double().sum())
    print(json.dumps({"img_per_s": args.batch * args.iters / seconds, "checksum": checksum}), flush=True)


def extract(revision: str, into: Path) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(REPOSITORY), "archive", revision, "franca"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def summarise(timings: dict[str, list[float]]) -> dict:
    """Speed ratios (current / baseline) of paired rounds: their median, the best rounds', the medians'."""
    current, baseline = timings["current"], timings["baseline"]
    return {
        "median_img_per_s": {name: statistics.median(values) for name, values in timings.items()},
        "paired_ratio_median": statistics.median(c / b for c, b in zip(current, baseline, strict=True)),
        "best_ratio": max(current) / max(baseline),
        "ratio_of_medians": statistics.median(current) / statistics.median(baseline),
    }


def run_worker(tree: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", "--arch", args.arch, "--image-size", str(args.image_size)]
    command += ["--batch", str(args.batch), "--iters", str(args.iters), "--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--baseline", help="git revision to compare with (e.g. the commit before the change)")
    p.add_argument("--arch", default="vit_base")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON file for the raw timings")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if not args.baseline:
        p.error("--baseline REV is required")
    with tempfile.TemporaryDirectory() as scratch:
        trees = {"baseline": extract(args.baseline, Path(scratch)), "current": REPOSITORY}
        timings = {name: [] for name in trees}
        checksums = {}
        for round_index in range(args.rounds):
            order = list(trees) if round_index % 2 == 0 else list(reversed(trees))
            for name in order:
                result = run_worker(trees[name], args)
                timings[name].append(result["img_per_s"])
                checksums[name] = result["checksum"]
            print(
                f"round {round_index + 1}/{args.rounds}: " + ", ".join(f"{n} {timings[n][-1]:.2f} img/s" for n in trees)
            )
    record = {
        "command": " ".join(["python benchmarks/plain_path.py", *sys.argv[1:]]),
        "baseline": args.baseline,
        "settings": {k: getattr(args, k) for k in ("arch", "image_size", "batch", "iters", "rounds", "threads")},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "img_per_s": timings,
        **summarise(timings),
        "identical_outputs": checksums["current"] == checksums["baseline"],
    }
    print(json.dumps({k: v for k, v in record.items() if k not in ("img_per_s", "settings", "machine")}))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
