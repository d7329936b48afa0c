"""Parity of the transformers / timm folders with franca at full depth (issue #25), on CPU, random weights, fp32.

    PYTHONPATH=. python benchmarks/interop_parity.py [--out benchmarks/results/interop_parity_cpu.json]
        [--archs B/14 L/14 g/14 quickstart] [--dinov3 S/16 B/16] [--threads 2]

Export: each released Franca architecture (full depth, 224 px grid) and the quickstart model are exported with
``franca.export.hf`` to both formats; the folder is loaded by the library and its CLS / patch tokens are compared with
franca's at the native size and at two other sizes (a smaller and a larger grid), where the libraries' position
interpolation differs from franca's (docs/export.md). Import: DINOv3 ViT-S/16 and ViT-B/16 built by transformers and
timm are loaded into franca and compared at two sizes. Weights are drawn so that attention is selective (matrices
N(0, 1/fan_in), LayerScale 0.5, norms 1 ± 0.1): with the released init (LayerScale 1e-5) the blocks are nearly
identities and any difference would hide.
"""

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from franca.export.hf import export_hf, library_forward, token_differences
from franca.hub import load_backbone
from franca.interop.model_card import Licence
from franca.models import ViTConfig
from franca.models.vision_transformer import DinoVisionTransformer

EXPORTS = {
    "B/14": ViTConfig.for_arch("vit_base", img_size=224),
    "L/14": ViTConfig.for_arch("vit_large", img_size=224),
    "g/14": ViTConfig.for_arch("vit_giant2", img_size=224),
    "quickstart": ViTConfig.for_arch(
        "vit_tiny", embed_dim=128, depth=4, num_heads=4, patch_size=4, img_size=28, layerscale=0.1
    ),
}
DINOV3 = {"S/16": ("vit_small_patch16_dinov3", 384, 6), "B/16": ("vit_base_patch16_dinov3", 768, 12)}
DINOV3_SIZES = ((224, 224), (160, 256))


@torch.no_grad()
def selective_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if param.ndim >= 2 and "token" not in name and "embed" not in name.split(".")[-1]:
            param.copy_(noise / param[0].numel() ** 0.5)
        elif any(s in name for s in ("gamma", "lambda1")):
            param.fill_(0.5)
        elif "norm" in name and name.endswith("weight"):
            param.copy_(1 + 0.1 * noise)
        else:
            param.copy_(0.5 * noise if param.ndim < 2 else 0.02 * noise)
    return model


def export_rows(name: str, config: ViTConfig, scratch: Path) -> list[dict]:
    model = selective_(DinoVisionTransformer(config)).eval()
    native, patch = config.img_size, config.patch_size
    sizes = (native, native - 4 * patch, native + 4 * patch)
    rows = []
    for fmt in ("transformers", "timm"):
        folder = scratch / f"{name.replace('/', '_')}_{fmt}"
        start = time.perf_counter()
        export_hf(model, folder, fmt, Licence("apache-2.0"), source=name, log=lambda _: None)
        seconds = time.perf_counter() - start
        theirs = library_forward(fmt, folder)
        for size in sizes:
            cls, patches = token_differences(theirs, model, size)
            rows.append(
                {
                    "model": name,
                    "format": fmt,
                    "size": size,
                    "native": size == native,
                    "cls": cls,
                    "patches": patches,
                    "export_s": seconds,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        del theirs  # one library model at a time: ViT-g/14 in fp32 is 4.5 GB
        gc.collect()
    return rows


def dinov3_rows(name: str, scratch: Path) -> list[dict]:
    import timm
    import transformers
    from timm.models._hub import save_for_hf

    timm_name, width, heads = DINOV3[name]
    hf_config = transformers.DINOv3ViTConfig(
        hidden_size=width,
        num_attention_heads=heads,
        num_hidden_layers=12,
        intermediate_size=4 * width,
        num_register_tokens=4,
    )
    hf_model = selective_(transformers.DINOv3ViTModel(hf_config)).eval()
    hf_model.save_pretrained(scratch / f"dinov3_{width}_hf")
    timm_model = selective_(timm.create_model(timm_name, pretrained=False, num_classes=0)).eval()
    save_for_hf(timm_model, scratch / f"dinov3_{width}_timm")
    libraries = {
        "transformers": (lambda x: hf_model(pixel_values=x).last_hidden_state, scratch / f"dinov3_{width}_hf"),
        "timm": (timm_model.forward_features, scratch / f"dinov3_{width}_timm"),
    }
    rows = []
    for fmt, (theirs, folder) in libraries.items():
        ours = load_backbone(folder).eval()
        for size in DINOV3_SIZES:
            x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                tokens, features = theirs(x), ours.forward_features(x)
            cls = (tokens[:, 0] - features["x_norm_clstoken"]).abs().max().item()
            patches = (tokens[:, 5:] - features["x_norm_patchtokens"]).abs().max().item()
            rows.append(
                {
                    "model": f"DINOv3 {name}",
                    "format": fmt,
                    "size": list(size),
                    "cls": cls,
                    "patches": patches,
                    "token_absmax": tokens.abs().max().item(),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--archs", nargs="*", default=list(EXPORTS))
    p.add_argument("--dinov3", nargs="*", default=list(DINOV3))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import timm
    import transformers

    record = {
        "command": " ".join(["python benchmarks/interop_parity.py", *sys.argv[1:]]),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "timm": timm.__version__},
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
        "export": [],
        "dinov3_import": [],
    }
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.archs:
            record["export"] += export_rows(name, EXPORTS[name], Path(scratch))
            for folder in Path(scratch).iterdir():  # keep at most one model's folders on disk
                for file in folder.iterdir():
                    file.unlink()
        for name in args.dinov3:
            record["dinov3_import"] += dinov3_rows(name, Path(scratch))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
