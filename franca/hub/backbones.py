"""Backbone entry points: ``franca_vitb14`` / ``franca_vitl14`` / ``franca_vitg14`` and ``load_backbone``.

The hub entries build the Franca ViT of valeoai/Franca ``franca/hub/backbones.py`` (patch 14, SwiGLU, LayerScale 1e-5,
no registers, interpolation offset 0.1, no antialias) at the image size of the checkpoint's ``pos_embed`` and load it
strictly: a checkpoint of another architecture is refused with its missing, unexpected and mis-shaped keys.
``load_backbone`` builds any of our ViTs from an arbitrary checkpoint, reading the architecture off its keys, and a
distilled timm student from the ``backbone_config`` stored with it (:mod:`franca.models.timm_backbone`).
"""

import json
import os
import warnings
from pathlib import Path

import torch

from franca.hub.loading import is_url, load_checkpoint_file, load_multipart_checkpoint, read_export_config
from franca.hub.registry import (
    DEFAULT_WEIGHTS,
    HUB_ENTRIES,
    ReleasedWeights,
    available_weights,
    get_weights,
    is_weights_name,
)
from franca.interop.folders import FRANCA_CONFIG_FILE, folder_format, read_foreign_folder
from franca.models.config import ARCHITECTURES, INPUT_DECODING_KEY, ViTConfig, stored_input_decoding
from franca.models.rasa_head import RASAHead
from franca.models.timm_backbone import TimmBackbone, TimmConfig, is_timm_config
from franca.models.vision_transformer import DinoVisionTransformer
from franca.models.weights import (
    extract_rasa_state_dict,
    extract_training_heads,
    from_release,
    infer_config,
    infer_image_size,
    load_strict,
)

# ---------------------------------------------------------------------------------------------------------------------
# Reading sources


def _read_release(release: ReleasedWeights) -> dict:
    if release.is_multipart:
        return load_multipart_checkpoint(release.urls, release.checkpoint_file, [a.sha256 for a in release.assets])
    return load_checkpoint_file(release.assets[0].url, release.assets[0].sha256)


def _describe_source(weights: str | os.PathLike, release: ReleasedWeights | None) -> str:
    if release is None:
        return str(weights)
    return f"{release.arch} weights {release.name!r} ({', '.join(release.urls)})"


def load_rasa_head(
    rasa_weights: str | os.PathLike, embed_dim: int | None = None, sha256: str | None = None
) -> RASAHead:
    """A RASA head from a file or URL (8 or 9 pre-layers, original keys, optional ``rasa_head.``/``module.`` prefix).

    ``embed_dim``, when given, must match the head's input size.
    """
    raw = load_checkpoint_file(rasa_weights, sha256, argument="rasa_weights")
    return _rasa_head_from_state(extract_rasa_state_dict(raw), embed_dim, str(rasa_weights))


def _rasa_head_from_state(state: dict, embed_dim: int | None, source: str) -> RASAHead:
    head = RASAHead.from_state_dict(state, source)
    if embed_dim is not None and head.input_dim != embed_dim:
        raise ValueError(
            f"the RASA head from {source} is for embedding size {head.input_dim}, but the backbone's is {embed_dim}; "
            "pass the RASA file trained for this backbone as rasa_weights="
        )
    return head


def _attach_rasa(
    model: DinoVisionTransformer,
    arch: str | None,
    use_rasa_head: bool,
    rasa_weights: str | os.PathLike | None,
    release: ReleasedWeights | None,
    embedded_rasa: dict,
) -> None:
    """Attach the RASA head from, in order: ``rasa_weights``; the release's ``_rasa.pth``; the checkpoint's tensors."""
    if rasa_weights is not None and is_weights_name(str(rasa_weights)):
        if arch is None:
            raise ValueError(f"rasa_weights={rasa_weights!r} is a released weights name: it needs a hub architecture")
        release = get_weights(arch, str(rasa_weights))
        rasa_weights = None
        use_rasa_head = True
    if rasa_weights is not None:
        model.attach_rasa_head(load_rasa_head(rasa_weights, model.embed_dim))
    elif not use_rasa_head:
        return
    elif release is not None:
        if release.rasa is None:
            with_rasa = [name for name in available_weights(release.arch) if get_weights(release.arch, name).has_rasa]
            raise ValueError(
                f"no RASA head was released for {release.arch} weights {release.name!r}; weights with one: "
                f"{with_rasa}; or pass your own head as rasa_weights=/path/to/rasa_head.pth"
            )
        model.attach_rasa_head(load_rasa_head(release.rasa.url, model.embed_dim, release.rasa.sha256))
    elif embedded_rasa:
        model.attach_rasa_head(_rasa_head_from_state(embedded_rasa, model.embed_dim, "the checkpoint's rasa_head.*"))
    else:
        raise ValueError(
            "use_rasa_head=True, but no RASA head is available: the weights are not a released name with a RASA "
            "file and the checkpoint holds no rasa_head.* tensors; pass rasa_weights=/path/to/rasa_head.pth"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Building and strict loading


def _architecture_hint(state_dict: dict) -> str:
    try:
        spec = infer_config(state_dict)
    except ValueError as err:
        return f"its architecture could not be read ({err})"
    name = spec.arch or "an unnamed ViT"
    return (
        f"the checkpoint looks like {name} (embed_dim={spec.embed_dim}, depth={spec.depth}, "
        f"patch_size={spec.patch_size}, ffn_layer={spec.ffn_layer}); load it with the matching hub entry or "
        "franca.hub.load_backbone(path) (torch.hub: franca_from_checkpoint), which reads the architecture off the file"
    )


def build_loaded_vit(config: ViTConfig, state_dict: dict, source: str) -> DinoVisionTransformer:
    """Build a ViT from ``config`` and load ``state_dict`` strictly (built on ``meta``: no wasted random init)."""
    with torch.device("meta"):
        model = DinoVisionTransformer(config)
    described = ", ".join(f"{k}={getattr(config, k)}" for k in ("embed_dim", "depth", "patch_size", "ffn_layer"))
    target = f"the requested ViT ({described})"
    load_strict(model, state_dict, source, target, hint=_architecture_hint(state_dict), assign=True)
    return model


def build_loaded_timm(stored: dict, state_dict: dict, source: str, kwargs: dict) -> TimmBackbone:
    """A distilled timm student (``backbone_config`` ``{"timm": name, ...}``, training.md "Distil") with its weights,
    loaded strictly. It needs the timm package (``pip install 'franca[timm]'``); keywords cannot change it."""
    if kwargs:
        raise ValueError(f"{source} is a timm backbone ({stored['timm']}); it takes no ViT keywords ({sorted(kwargs)})")
    model = TimmBackbone(TimmConfig.from_dict(stored, source=f"the backbone config of {source}"))
    load_strict(model, state_dict, source, f"the timm backbone {stored['timm']}")
    return model


def _checkpoint_image_size(requested: int | None, checkpoint_img_size: int) -> int:
    """Build at the checkpoint's own grid; an ``img_size=`` keyword that disagrees is refused (a resized grid would
    change the outputs at every other input size, while the model already runs at any size divisible by the patch)."""
    if requested and requested != checkpoint_img_size:
        raise ValueError(
            f"img_size={requested} conflicts with the checkpoint's position grid (built for {checkpoint_img_size}px); "
            "leave img_size out: the model runs at any input size divisible by the patch size. To change the grid "
            "itself (high-resolution finetuning), use scripts/modify_ckpt_highres.py"
        )
    return checkpoint_img_size


def _hub_model(
    arch: str,
    pretrained: bool,
    weights: str | os.PathLike,
    use_rasa_head: bool,
    rasa_weights: str | os.PathLike | None,
    kwargs: dict,
) -> DinoVisionTransformer:
    release = get_weights(arch, str(weights)) if is_weights_name(str(weights)) else None
    kwargs = dict(kwargs)
    requested_size = kwargs.pop("img_size", None)
    config = ViTConfig.for_arch(arch, **kwargs)
    if not pretrained:
        if use_rasa_head and rasa_weights is None:
            raise ValueError("pretrained=False with use_rasa_head=True needs rasa_weights= (a RASA head file)")
        default_size = (release or get_weights(arch, DEFAULT_WEIGHTS[arch])).img_size
        model = DinoVisionTransformer(config.with_overrides(img_size=requested_size or default_size))
        _attach_rasa(model, arch, False, rasa_weights, None, {})
        return model
    raw = _read_release(release) if release is not None else load_checkpoint_file(weights)
    state_dict, embedded_rasa = from_release(raw)
    img_size = _checkpoint_image_size(requested_size, infer_image_size(state_dict, config.patch_size))
    model = build_loaded_vit(config.with_overrides(img_size=img_size), state_dict, _describe_source(weights, release))
    _attach_rasa(model, arch, use_rasa_head, rasa_weights, release, embedded_rasa)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Public entry points


def franca_vitb14(
    pretrained: bool = True,
    weights: str | os.PathLike = DEFAULT_WEIGHTS["vit_base"],
    use_rasa_head: bool = False,
    rasa_weights: str | os.PathLike | None = None,
    **kwargs,
) -> DinoVisionTransformer:
    """Franca ViT-B/14. ``weights``: a released name (IN21K, IN21K_224, DINOV2_IN21K, DINOV2_IN21K_518), a file,
    a safetensors export folder or a URL. ``use_rasa_head`` attaches the released (or embedded) RASA head;
    ``rasa_weights`` a given one. Other keywords go to the ViT constructor."""
    return _hub_model("vit_base", pretrained, weights, use_rasa_head, rasa_weights, kwargs)


def franca_vitl14(
    pretrained: bool = True,
    weights: str | os.PathLike = DEFAULT_WEIGHTS["vit_large"],
    use_rasa_head: bool = False,
    rasa_weights: str | os.PathLike | None = None,
    **kwargs,
) -> DinoVisionTransformer:
    """Franca ViT-L/14. ``weights``: LAION, LAION_224, LAION_518, DINOV2_IN21K, DINOV2_IN21K_518, a file, a folder
    or a URL; see :func:`franca_vitb14` for the other arguments."""
    return _hub_model("vit_large", pretrained, weights, use_rasa_head, rasa_weights, kwargs)


def franca_vitg14(
    pretrained: bool = True,
    weights: str | os.PathLike = DEFAULT_WEIGHTS["vit_giant2"],
    use_rasa_head: bool = False,
    rasa_weights: str | os.PathLike | None = None,
    **kwargs,
) -> DinoVisionTransformer:
    """Franca ViT-g/14. ``weights``: LAION (a split release, joined and extracted once), a file, a folder or a URL;
    see :func:`franca_vitb14` for the other arguments."""
    return _hub_model("vit_giant2", pretrained, weights, use_rasa_head, rasa_weights, kwargs)


def _resolve_arch(arch: str | None) -> str | None:
    if arch is None or arch in ARCHITECTURES:
        return arch
    if arch in HUB_ENTRIES:
        return HUB_ENTRIES[arch]
    raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHITECTURES)} or {sorted(HUB_ENTRIES)}")


def _stored_config(weights: str | os.PathLike, raw: dict) -> dict | None:
    """The stored backbone config of a checkpoint: the ``backbone_config`` our trainer writes beside the teacher, or
    an export folder's ``config.json``; None when there is none (released and older files)."""
    if isinstance(raw, dict) and raw.get("backbone_config") is not None:
        return raw["backbone_config"]
    if not is_url(str(weights)) and os.path.isdir(weights):
        return read_export_config(weights)
    return None


def _generic_config(
    weights: str | os.PathLike, state_dict: dict, arch: str | None, stored: dict | None, kwargs: dict
) -> ViTConfig:
    """The ViTConfig of an arbitrary checkpoint: ``stored`` (:func:`_stored_config`), else read off the keys; then
    ``arch``'s width/depth/heads, then ``kwargs``."""
    if stored is not None:
        config = ViTConfig.from_dict(stored, source=f"the backbone config of {weights}")
    else:
        config = infer_config(state_dict, num_heads=kwargs.get("num_heads"))
        if arch is None and "num_heads" not in kwargs and config.arch is None:
            warnings.warn(
                f"{weights} stores no backbone config and its width {config.embed_dim} is not a standard one: the head "
                f"count is guessed as {config.num_heads} (width / 64), which the weights' shapes cannot confirm; pass "
                "num_heads= if the model was trained with another",
                UserWarning,
                stacklevel=3,
            )
    if arch is not None:
        named = ViTConfig.for_arch(arch)
        config = config.with_overrides(embed_dim=named.embed_dim, depth=named.depth, num_heads=named.num_heads)
    kwargs = dict(kwargs)
    requested_size = kwargs.pop("img_size", None)
    config = config.with_overrides(**kwargs)
    if config.uses_rope:  # no position grid: the stored size is the one the model was trained at
        return config.with_overrides(img_size=requested_size or config.img_size)
    img_size = _checkpoint_image_size(requested_size, infer_image_size(state_dict, config.patch_size))
    return config.with_overrides(img_size=img_size)


def load_backbone(
    weights: str | os.PathLike,
    arch: str | None = None,
    rasa_weights: str | os.PathLike | None = None,
    use_rasa_head: bool = False,
    **kwargs,
) -> DinoVisionTransformer:
    """Any backbone: a hub name (``franca_vitb14``, ``franca_vitb14:IN21K_224``), a released weights name with
    ``arch``, a checkpoint file / export folder / URL of any of our ViTs (architecture read off the keys; ``arch``
    sets the number of heads of a non-standard one, keywords override the rest), or a transformers / timm folder of
    a DINOv2, DINOv3 or exported Franca backbone (:mod:`franca.interop.folders`)."""
    arch = _resolve_arch(arch)
    entry, _, name = str(weights).partition(":")
    if entry in HUB_ENTRIES and not os.path.exists(weights):
        if arch is not None and arch != HUB_ENTRIES[entry]:
            raise ValueError(f"weights={str(weights)!r} is a {HUB_ENTRIES[entry]} hub entry, but arch={arch!r}")
        arch = HUB_ENTRIES[entry]
        return _hub_model(arch, True, name or DEFAULT_WEIGHTS[arch], use_rasa_head, rasa_weights, kwargs)
    if is_weights_name(str(weights)):
        if arch is None:
            raise ValueError(
                f"weights={str(weights)!r} is a released weights name: give arch= too, or use a hub name such as "
                f"'franca_vitb14:{str(weights).upper()}'"
            )
        return _hub_model(arch, True, weights, use_rasa_head, rasa_weights, kwargs)
    model, _ = _load_file_backbone(weights, arch, rasa_weights, use_rasa_head, kwargs)
    return model


def _load_file_backbone(
    weights: str | os.PathLike,
    arch: str | None,
    rasa_weights,
    use_rasa_head: bool,
    kwargs: dict,
    argument: str = "weights",
) -> tuple[DinoVisionTransformer, dict | None]:
    """The backbone of a checkpoint file / export folder / transformers or timm folder / URL, and the raw checkpoint
    it was read from (None for a transformers or timm folder). ``argument`` names ``weights`` in errors."""
    raw = None
    if not is_url(str(weights)) and folder_format(weights) is not None:
        config, state_dict = read_foreign_folder(weights)
        stored, embedded_rasa = {**config.to_dict(), **_franca_config_decoding(weights)}, {}
    else:
        raw = load_checkpoint_file(weights, argument=argument)
        stored = _stored_config(weights, raw)
        state_dict, embedded_rasa = from_release(raw)
    if is_timm_config(stored):
        model = build_loaded_timm(stored, state_dict, str(weights), kwargs)
    else:
        model = build_loaded_vit(_generic_config(weights, state_dict, arch, stored, kwargs), state_dict, str(weights))
    model.input_decoding = stored_input_decoding(stored, f"the backbone config of {weights}")
    _attach_rasa(model, arch, use_rasa_head, rasa_weights, None, embedded_rasa)
    return model, raw


def _franca_config_decoding(folder: str | os.PathLike) -> dict:
    """``{"input_decoding": …}`` of an exported transformers / timm folder's ``franca_config.json``, else {}."""
    path = Path(folder) / FRANCA_CONFIG_FILE
    stored = json.loads(path.read_text()) if path.is_file() else {}
    return {key: stored[key] for key in (INPUT_DECODING_KEY,) if key in stored}


def load_backbone_and_heads(
    weights: str | os.PathLike, argument: str = "weights"
) -> tuple[DinoVisionTransformer, dict[str, dict]]:
    """:func:`load_backbone` of ``weights`` (architecture read off the file), with the DINO / iBOT heads the file
    carries (``{"dino_head": …, "ibot_head": …}``; none for hub names and released weights, which ship no heads).
    ``argument`` names ``weights`` in errors (``student.pretrained_weights`` for the trainer)."""
    entry = str(weights).partition(":")[0]
    if (entry in HUB_ENTRIES and not os.path.exists(weights)) or is_weights_name(str(weights)):
        return load_backbone(weights), {}
    model, raw = _load_file_backbone(weights, None, None, False, {}, argument)
    return model, extract_training_heads(raw) if isinstance(raw, dict) else {}


def franca_from_checkpoint(
    weights: str | os.PathLike,
    arch: str | None = None,
    use_rasa_head: bool = False,
    rasa_weights: str | os.PathLike | None = None,
    **kwargs,
) -> DinoVisionTransformer:
    """Any Franca backbone in one call, architecture read off the file: a release ``.pth`` (with or without
    ``backbone_config``), a ``teacher_checkpoint.pth``, a training checkpoint ``model_*.pth`` (its teacher backbone),
    a safetensors export folder or file, a URL of one of those, a hub name such as ``franca_vitb14:IN21K_224``, or a
    transformers / timm folder (DINOv2, DINOv3, or one ``python -m franca.export.hf`` wrote).
    ``num_heads=`` fixes the head count of a non-standard width stored without a config; see :func:`load_backbone`."""
    return load_backbone(weights, arch=arch, rasa_weights=rasa_weights, use_rasa_head=use_rasa_head, **kwargs)
