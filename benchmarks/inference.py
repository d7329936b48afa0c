"""Backbone inference speed: our ViT against timm's same-size DINOv2 ViT, eager and torch.compile'd, in bf16.

For each architecture (ViT-B/14, ViT-L/14) and setting (224 px batch 128, 518 px batch 16) it reports img/s of
- ours as released (SwiGLU FFN, ``ffn_layer=swiglufused``),
- ours with the plain MLP FFN loaded with timm's weights (identical architecture to timm's), and
- timm's ``vit_{base,large}_patch14_dinov2``,
plus the max |difference| between ours-with-timm-weights and timm (fp32, same weights), and the max |difference| of
our bf16 output against our fp32 output. Results go to ``<out>/inference.json`` and a Markdown table on stdout.

    python benchmarks/inference.py --out results/   # needs a CUDA GPU and timm
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from franca.models import build_vit

TIMM_NAMES = {"vit_base": "vit_base_patch14_dinov2", "vit_large": "vit_large_patch14_dinov2"}


def timm_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm DINOv2 ViT keys → ours (``mlp.fc1/fc2`` and ``ls*.gamma`` are the same names; drop timm-only keys)."""
    return {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm.", "reg_token"))}


def build_pair(arch: str, img_size: int, device: torch.device):
    import timm

    theirs = timm.create_model(TIMM_NAMES[arch], pretrained=False, img_size=img_size, num_classes=0)
    ours_mlp = build_vit(arch, img_size=img_size, patch_size=14, ffn_layer="mlp")
    missing, unexpected = ours_mlp.load_state_dict(timm_to_ours(theirs.state_dict()), strict=False)
    if set(missing) != {"mask_token"} or unexpected:  # timm has no mask token (unused at inference)
        raise RuntimeError(f"timm → ours key mapping failed: missing {missing[:5]}, unexpected {unexpected[:5]}")
    ours = build_vit(arch, img_size=img_size, patch_size=14, ffn_layer="swiglufused")
    return {"ours_swiglu": ours, "ours_mlp": ours_mlp, "timm": theirs}


@torch.no_grad()
def time_model(model, x: torch.Tensor, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        model(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        model(x)
    end.record()
    torch.cuda.synchronize()
    return x.shape[0] * iters / (start.elapsed_time(end) / 1000)


@torch.no_grad()
def parity(models: dict, img_size: int, device: torch.device) -> dict:
    x = torch.randn(4, 3, img_size, img_size, device=device)
    ours_mlp = models["ours_mlp"].to(device).float().eval()
    theirs = models["timm"].to(device).float().eval()
    timm_cls = theirs.forward_features(x)[:, 0]
    diff_timm = (ours_mlp(x) - timm_cls).abs().max().item()
    ours = models["ours_swiglu"].to(device).float().eval()
    ref = ours(x)
    bf16 = ours.to(torch.bfloat16)(x.bfloat16()).float()
    ours.float()
    return {
        "max_abs_diff_ours_vs_timm_fp32": diff_timm,
        "max_abs_diff_bf16_vs_fp32": (bf16 - ref).abs().max().item(),
        "fp32_output_absmax": ref.abs().max().item(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["vit_base", "vit_large"])
    p.add_argument("--settings", nargs="+", default=["224:128", "518:16"], help="image_size:batch pairs")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/inference.py measures GPU throughput and needs CUDA")
    import timm

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    for arch in args.archs:
        for setting in args.settings:
            size, batch = map(int, setting.split(":"))
            models = build_pair(arch, size, device)
            check = parity(models, size, device)
            x = torch.randn(batch, 3, size, size, device=device, dtype=torch.bfloat16)
            for name, model in models.items():
                model = model.to(device, torch.bfloat16).eval()
                forward = model if name != "timm" else model.forward_features
                row = {"arch": arch, "image_size": size, "batch": batch, "model": name}
                row["eager_img_s"] = time_model(forward, x, args.warmup, args.iters)
                if not args.no_compile:
                    compiled = torch.compile(forward)
                    t0 = time.perf_counter()
                    compiled(x)
                    row["compile_s"] = time.perf_counter() - t0
                    row["compiled_img_s"] = time_model(compiled, x, args.warmup, args.iters)
                row.update(check)
                rows.append(row)
                print(json.dumps(row), flush=True)
                (out / "inference.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
                torch._dynamo.reset()
            del models
            torch.cuda.empty_cache()
    print(f"\n{meta}\n")
    print("| arch | px | batch | model | eager img/s | compiled img/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        compiled = f"{r['compiled_img_s']:.0f}" if "compiled_img_s" in r else "-"
        print(
            f"| {r['arch']} | {r['image_size']} | {r['batch']} | {r['model']} | {r['eager_img_s']:.0f} | {compiled} |"
        )


if __name__ == "__main__":
    main()
