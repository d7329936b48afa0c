"""Export a backbone as a Hugging Face transformers folder or a timm Hub folder, with a model card.

``python -m franca.export.hf --weights W --format transformers|timm --out DIR [--rasa-weights H] [--arch A]
[--license L] [--results-dir R] [--atol 1e-5]``

``W`` is anything :func:`franca.hub.franca_from_checkpoint` reads. The folder holds the library's ``config.json`` and
``model.safetensors`` (transformers: also ``preprocessor_config.json``), ``franca_config.json`` (our exact
configuration, read back by franca), ``README.md`` (the model card: :mod:`franca.interop.model_card`), with
``--rasa-weights`` a ``rasa_head.safetensors``, and for research-only weights a copy of ``LICENSE_MODEL``. After
writing, the command loads the folder with the library itself and compares its CLS and patch tokens with franca's at
the native size (fails above ``--atol``) and at one other size (reported in the card). Layouts and the interpolation
difference at other sizes: docs/export.md, "transformers and timm".
"""

import argparse
import json
import os
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import torch

from franca.data.augmentations import IMAGENET_MEAN, IMAGENET_STD
from franca.eval.lib.common import classification_resize
from franca.export.wrappers import add_model_arguments, load_export_model
from franca.hub.registry import ReleasedWeights, release_of
from franca.interop.extras import require
from franca.interop.folders import FRANCA_CONFIG_FILE, SAFETENSORS_FILE
from franca.interop.model_card import (
    LICENSE_FILE,
    RESEARCH_ONLY,
    CardFacts,
    Licence,
    read_evaluations,
    recipe_of,
    render_card,
    run_config_path,
)
from franca.interop.renaming import complete_for_export
from franca.interop.timm_format import pretrained_cfg, timm_architecture, to_timm_state
from franca.interop.transformers_format import preprocessor_config, to_transformers_state, transformers_config
from franca.models.safetensors_folder import RASA_FILE, save_tensors
from franca.models.vision_transformer import DinoVisionTransformer
from franca.models.weights import RASA_PREFIX
from franca.utils.atomic import atomic_write

FORMATS = ("transformers", "timm")  # each is also the name of the library's module
PREPROCESSOR_FILE = "preprocessor_config.json"
CARD_FILE = "README.md"
# Files this command writes; one an earlier export left that this one does not write is removed.
MANAGED_FILES = (
    "config.json",
    SAFETENSORS_FILE,
    PREPROCESSOR_FILE,
    FRANCA_CONFIG_FILE,
    RASA_FILE,
    CARD_FILE,
    LICENSE_FILE,
)
# Weight files of other writers that the libraries would read instead of (or beside) ours.
OTHER_WEIGHT_FILES = ("model.safetensors.index.json", "pytorch_model.bin", "open_clip_pytorch_model.bin")
REPOSITORY_ROOT = Path(__file__).resolve().parents[2]


def choose_licence(requested: str | None, release: ReleasedWeights | None) -> Licence:
    """Released weights: research-only, whatever is asked; a user's own model: ``--license``, which is required."""
    if release is not None:
        if requested not in (None, RESEARCH_ONLY):
            raise ValueError(
                f"--license {requested}: the released weights {release.name!r} are under the Franca authors' "
                f"research-only licence (LICENSE_MODEL); leave --license out (or pass {RESEARCH_ONLY})"
            )
        return Licence(RESEARCH_ONLY)
    if not requested:
        raise ValueError(
            "--license is required for your own weights: a Hugging Face licence id such as apache-2.0, mit or "
            f"cc-by-4.0, or {RESEARCH_ONLY} if they derive from the released Franca weights"
        )
    return Licence(requested)


def licence_text() -> str:
    """The text of ``LICENSE_MODEL``: from the repository, else from the installed package's licence files."""
    candidates = [REPOSITORY_ROOT / LICENSE_FILE]
    try:
        files = distribution("franca").files or []
        candidates += [Path(str(f.locate())) for f in files if f.name == LICENSE_FILE]
    except PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path.read_text()
    raise FileNotFoundError(f"{LICENSE_FILE} was not found beside the franca package; reinstall franca")


# ---------------------------------------------------------------------------------------------------------------------
# The folder's files


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file; the export is a folder")
    clashing = [name for name in OTHER_WEIGHT_FILES if (out_dir / name).exists()]
    if clashing:
        raise FileExistsError(
            f"--out {out_dir} already holds {clashing}, which the libraries would load instead of this export; "
            "choose an empty folder"
        )


def _json(value: dict) -> str:
    return json.dumps(value, indent=2) + "\n"


def library_files(model: DinoVisionTransformer, fmt: str, licence: Licence) -> dict[str, str | dict]:
    """The library's own files: name → JSON text, or → tensors for ``model.safetensors``."""
    config = model.config
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith(RASA_PREFIX)}
    state = complete_for_export(backbone, config)
    resize = classification_resize(config.img_size)
    if fmt == "transformers":
        dtype = next(model.parameters()).dtype
        return {
            "config.json": _json(transformers_config(config, dtype)),
            PREPROCESSOR_FILE: _json(preprocessor_config(config.img_size, resize, IMAGENET_MEAN, IMAGENET_STD)),
            SAFETENSORS_FILE: to_transformers_state(state),
        }
    name, model_args = timm_architecture(config)
    record = {
        "architecture": name,
        "num_classes": 0,
        "num_features": config.embed_dim,
        "global_pool": "token",
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg(config, resize, IMAGENET_MEAN, IMAGENET_STD, licence.hub_id),
    }
    return {"config.json": _json(record), SAFETENSORS_FILE: to_timm_state(state, config)}


def rasa_tensors(model: DinoVisionTransformer) -> dict[str, torch.Tensor] | None:
    """The RASA head's original keys plus ``folded_matrix`` (M, applied as ``patches @ M.T``), or None."""
    if model.rasa_head is None:
        return None
    head = model.rasa_head
    return {**head.state_dict(), "folded_matrix": head.folded_matrix().detach()}


def write_folder(files: dict[str, str | dict], out_dir: Path) -> None:
    """Write every file atomically; managed files not in ``files`` (left by an earlier export, and the card, which is
    written last) are removed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if isinstance(content, dict):
            save_tensors(content, out_dir / name)
        else:
            atomic_write(out_dir / name, content)
    for name in MANAGED_FILES:
        if name not in files:
            (out_dir / name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------------
# Checking the folder with the library


def library_forward(fmt: str, folder: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """images → all output tokens [B, 1 + R + N, D] (final norm applied) of the folder loaded by its library."""
    if fmt == "transformers":
        transformers = require("transformers", "checking the transformers export")
        model = transformers.AutoModel.from_pretrained(str(folder)).float().eval()
        return lambda images: model(pixel_values=images).last_hidden_state
    timm = require("timm", "checking the timm export")
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).float().eval()
    return model.forward_features


@torch.no_grad()
def token_differences(
    theirs: Callable[[torch.Tensor], torch.Tensor], model: DinoVisionTransformer, size: int, seed: int = 0
) -> tuple[float, float]:
    """Max |difference| of the CLS and of the patch tokens, library against franca, on 2 random images."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, model.config.in_chans, size, size, generator=generator)
    tokens = theirs(images)
    ours = model.forward_features(images)
    cls = (tokens[:, 0] - ours["x_norm_clstoken"]).abs().max().item()
    patches = (tokens[:, 1 + model.num_register_tokens :] - ours["x_norm_patchtokens"]).abs().max().item()
    return cls, patches


def check_parity(fmt: str, folder: Path, model: DinoVisionTransformer, atol: float) -> dict:
    """Library against franca at the native size (must be within ``atol``) and two patches larger (reported)."""
    model = model.float().eval()
    theirs = library_forward(fmt, folder)
    native = model.config.img_size
    other = native + 2 * model.patch_size
    native_cls, native_patch = token_differences(theirs, model, native)
    if max(native_cls, native_patch) > atol:
        raise RuntimeError(
            f"{fmt} loads {folder} with CLS / patch tokens {native_cls:.2e} / {native_patch:.2e} away from franca's at "
            f"{native} px (more than --atol {atol}); the folder was written but does not reproduce the model: please "
            "report this with the model's config"
        )
    other_cls, other_patch = token_differences(theirs, model, other)
    return {
        "native_size": native,
        "native_cls": native_cls,
        "native_patch": native_patch,
        "other_size": other,
        "other_cls": other_cls,
        "other_patch": other_patch,
    }


# ---------------------------------------------------------------------------------------------------------------------
# The card


def usage(fmt: str, registers: int) -> str:
    """How to load the folder with its library and split CLS from patch tokens."""
    prefix = 1 + registers
    if fmt == "transformers":
        return (
            "from transformers import AutoImageProcessor, AutoModel\n\n"
            'processor = AutoImageProcessor.from_pretrained("path/to/folder")  # or the Hub repository id\n'
            'model = AutoModel.from_pretrained("path/to/folder").eval()\n'
            'tokens = model(**processor(images=image, return_tensors="pt")).last_hidden_state\n'
            f"cls, patches = tokens[:, 0], tokens[:, {prefix}:]"
        )
    return (
        "import timm\n\n"
        'model = timm.create_model("local-dir:path/to/folder", pretrained=True).eval()  # or "hf-hub:<repo id>"\n'
        "transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))\n"
        "tokens = model.forward_features(transform(image).unsqueeze(0))\n"
        f"cls, patches = tokens[:, 0], tokens[:, {prefix}:]"
    )


def preprocessing(img_size: int) -> str:
    """The preprocessing the folder's records describe, in words."""
    return (
        f"Preprocessing (franca's evaluation transform): resize the shorter side to {classification_resize(img_size)} "
        f"px (bicubic), centre-crop {img_size} px, scale to [0, 1], normalise with mean {list(IMAGENET_MEAN)} and std "
        f"{list(IMAGENET_STD)}. The model runs at any size divisible by the patch size; patch tokens are row-major."
    )


def card_facts(
    model: DinoVisionTransformer,
    fmt: str,
    source: str,
    licence: Licence,
    parity: dict,
    release: ReleasedWeights | None,
    results_dir: str | None,
) -> CardFacts:
    config_path = run_config_path(source) if release is None else None
    backbone = [p for name, p in model.named_parameters() if not name.startswith(RASA_PREFIX)]
    return CardFacts(
        library=fmt,
        config=model.config,
        parameters=sum(p.numel() for p in backbone),
        source=source,
        licence=licence,
        usage=usage(fmt, model.num_register_tokens),
        parity=parity,
        release=release,
        recipe=recipe_of(config_path, source) if config_path else [],
        recipe_source=str(config_path or ""),
        evaluations=read_evaluations(results_dir) if results_dir else [],
        has_rasa=model.rasa_head is not None,
        preprocessing=preprocessing(model.config.img_size),
    )


# ---------------------------------------------------------------------------------------------------------------------
# The command


def export_hf(
    model: DinoVisionTransformer,
    out_dir: str | os.PathLike,
    fmt: str,
    licence: Licence,
    source: str = "",
    release: ReleasedWeights | None = None,
    results_dir: str | None = None,
    atol: float = 1e-5,
    log: Callable[[str], None] = print,
) -> dict:
    """Write the ``fmt`` folder of ``model`` into ``out_dir``, check it with the library, write the card; returns the
    measured differences (:func:`check_parity`)."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is unknown; choose one of {list(FORMATS)}")
    require(fmt, f"the {fmt} export")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    files: dict[str, str | dict] = library_files(model, fmt, licence)
    files[FRANCA_CONFIG_FILE] = _json(model.build_config())
    rasa = rasa_tensors(model)
    if rasa is not None:
        files[RASA_FILE] = rasa
    if licence.research_only:
        files[LICENSE_FILE] = licence_text()
    log(f"[2/3] writing the {fmt} folder {out_dir}")
    write_folder(files, out_dir)
    log(f"[3/3] loading it with {fmt} and comparing with franca")
    parity = check_parity(fmt, out_dir, model, atol)
    card = render_card(card_facts(model, fmt, source, licence, parity, release, results_dir))
    atomic_write(out_dir / CARD_FILE, card)
    return parity


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m franca.export.hf", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--format", required=True, choices=FORMATS, help="the library the folder is for")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--license",
        default=None,
        help=f"licence of your own weights (a Hugging Face licence id, e.g. apache-2.0; {RESEARCH_ONLY} for weights "
        "derived from the released ones); released weights are always research-only",
    )
    parser.add_argument("--results-dir", default=None, help="folder of results_eval_*.json to put in the model card")
    parser.add_argument("--atol", type=float, default=1e-5, help="largest token difference allowed at the native size")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        release = release_of(args.weights, args.arch)
        licence = choose_licence(args.license, release)
        if args.results_dir:
            read_evaluations(args.results_dir)
        require(args.format, f"the {args.format} export")
        print(f"[1/3] loading {args.weights}", flush=True)
        model = load_export_model(args.weights, args.rasa_weights, args.arch)
        parity = export_hf(model, args.out, args.format, licence, args.weights, release, args.results_dir, args.atol)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, ImportError) as err:
        parser.error(str(err))
    print(
        f"wrote {args.out}: {args.format} matches franca to {max(parity['native_cls'], parity['native_patch']):.1e} at "
        f"{parity['native_size']} px ({max(parity['other_cls'], parity['other_patch']):.1e} at {parity['other_size']} "
        "px, where the libraries resize position embeddings differently: see README.md)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
