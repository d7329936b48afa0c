"""Registry of the released Franca / DINOv2-baseline weights (the v1.0.0 and v1.1.0 GitHub releases of valeoai/Franca).

Each entry maps (architecture, weights name) to its release asset(s), the image size its position grid was built for
and its RASA head file, if one was released. SHA-256 digests are recorded per asset; ``None`` means the digest is not
published (the assets could not be downloaded where this registry was written). The loader then trusts the first
download and checks every later load of the cached file against the digest it recorded (:mod:`franca.hub.loading`);
a published digest, once filled in here, rules over that record.
"""

import os
from dataclasses import dataclass

RELEASES_URL = "https://github.com/valeoai/Franca/releases/download"

WEIGHTS_NAMES = ("IN21K", "IN21K_224", "LAION", "LAION_224", "LAION_518", "DINOV2_IN21K", "DINOV2_IN21K_518")
# Other names of released weights: the upstream model card (valeoai/Franca ``model_card.md``) calls the 518 px
# ViT-B/14 IN21K release "IN21K_518".
WEIGHTS_ALIASES = {"IN21K_518": "IN21K"}

# What each release was trained on (valeoai/Franca README and ``model_card.md``; our model_card.md).
TRAINING_DATA = {
    "IN21K": "ImageNet-21K, then 518 px finetuning on ImageNet-1k",
    "IN21K_224": "ImageNet-21K",
    "DINOV2_IN21K": "ImageNet-21K (DINOv2 baseline)",
    "DINOV2_IN21K_518": "ImageNet-21K, then 518 px finetuning (DINOv2 baseline)",
    "LAION": "LAION-600M",
    "LAION_224": "LAION-600M",
    "LAION_518": "LAION-600M, then 518 px finetuning on LAION shards",
}

# torch.hub entry name -> architecture; patch size 14 for all of them.
HUB_ENTRIES = {"franca_vitb14": "vit_base", "franca_vitl14": "vit_large", "franca_vitg14": "vit_giant2"}

# Defaults of the original v1.1 hub entries.
DEFAULT_WEIGHTS = {"vit_base": "IN21K", "vit_large": "LAION", "vit_giant2": "LAION"}


@dataclass(frozen=True)
class ReleaseAsset:
    """One file attached to a GitHub release of valeoai/Franca."""

    tag: str
    file: str
    sha256: str | None = None

    @property
    def url(self) -> str:
        return f"{RELEASES_URL}/{self.tag}/{self.file}"


@dataclass(frozen=True)
class ReleasedWeights:
    """A released backbone: one ``.pth`` asset, or the parts of a split ``.tar.gz`` holding ``checkpoint_file``."""

    arch: str
    name: str
    img_size: int
    assets: tuple[ReleaseAsset, ...]
    checkpoint_file: str
    rasa: ReleaseAsset | None = None

    @property
    def urls(self) -> list[str]:
        return [asset.url for asset in self.assets]

    @property
    def is_multipart(self) -> bool:
        return len(self.assets) > 1

    @property
    def has_rasa(self) -> bool:
        return self.rasa is not None


def _single(arch: str, name: str, img_size: int, tag: str, stem: str, rasa_tag: str | None = None) -> ReleasedWeights:
    rasa = ReleaseAsset(rasa_tag, f"{stem}_rasa.pth") if rasa_tag else None
    return ReleasedWeights(arch, name, img_size, (ReleaseAsset(tag, f"{stem}.pth"),), f"{stem}.pth", rasa)


def _split_tar(arch: str, name: str, img_size: int, tag: str, stem: str, rasa_tag: str | None) -> ReleasedWeights:
    parts = tuple(ReleaseAsset(tag, f"{stem}_chunked.tar.gz.part_{suffix}") for suffix in ("aa", "ab", "ac"))
    rasa = ReleaseAsset(rasa_tag, f"{stem}_rasa.pth") if rasa_tag else None
    return ReleasedWeights(arch, name, img_size, parts, f"{stem}.pth", rasa)


_ENTRIES = (
    _single("vit_base", "IN21K", 518, "v1.0.0", "franca_vitb14_In21K", rasa_tag="v1.0.0"),
    _single("vit_base", "IN21K_224", 224, "v1.1.0", "franca_vitb14_In21K_224"),
    _single("vit_base", "DINOV2_IN21K", 224, "v1.1.0", "franca_vitb14_Dinov2_In21K"),
    _single("vit_base", "DINOV2_IN21K_518", 518, "v1.1.0", "franca_vitb14_Dinov2_In21K_518", rasa_tag="v1.1.0"),
    _single("vit_large", "LAION", 518, "v1.0.0", "franca_vitl14_Laion600M", rasa_tag="v1.0.0"),
    _single("vit_large", "LAION_224", 224, "v1.1.0", "franca_vitl14_Laion600M_224"),
    _single("vit_large", "DINOV2_IN21K", 224, "v1.1.0", "franca_vitl14_Dinov2_In21K"),
    _single("vit_large", "DINOV2_IN21K_518", 518, "v1.1.0", "franca_vitl14_Dinov2_In21K_518", rasa_tag="v1.1.0"),
    _single("vit_large", "LAION_518", 518, "v1.1.0", "franca_vitl14_Laion_518", rasa_tag="v1.1.0"),
    _split_tar("vit_giant2", "LAION", 224, "v1.0.0", "franca_vitg14_Laion600M", rasa_tag="v1.0.0"),
)

REGISTRY: dict[tuple[str, str], ReleasedWeights] = {(entry.arch, entry.name): entry for entry in _ENTRIES}


def is_weights_name(value: str) -> bool:
    """Whether ``value`` names released weights (case-insensitive, aliases too), as opposed to a path or URL."""
    return isinstance(value, str) and (value.upper() in WEIGHTS_NAMES or value.upper() in WEIGHTS_ALIASES)


def available_weights(arch: str) -> list[str]:
    """Released weights names for an architecture, in registry order."""
    return [name for (entry_arch, name) in REGISTRY if entry_arch == arch]


def get_weights(arch: str, name: str) -> ReleasedWeights:
    """The registry entry for (arch, name); errors list what was released for ``arch``."""
    available = available_weights(arch)
    if not available:
        archs = sorted({entry_arch for entry_arch, _ in REGISTRY})
        raise ValueError(f"no weights were released for architecture {arch!r}; released architectures: {archs}")
    canonical = WEIGHTS_ALIASES.get(name.upper(), name.upper())
    key = (arch, canonical)
    if key not in REGISTRY:
        alias = f" (another name of {canonical})" if canonical != name.upper() else ""
        raise ValueError(
            f"weights {name!r}{alias} were not released for {arch}; available for {arch}: {available} "
            f"(or pass a local file, folder or URL as weights=)"
        )
    return REGISTRY[key]


def release_of(weights: str, arch: str | None = None) -> ReleasedWeights | None:
    """The release a ``weights`` value names: a hub name (``franca_vitb14``, ``franca_vitb14:IN21K_224``), a weights
    name with ``arch``, or the URL of a released file; None for anything else (a local file or folder)."""
    entry, _, name = str(weights).partition(":")
    if entry in HUB_ENTRIES and not os.path.exists(weights):
        return get_weights(HUB_ENTRIES[entry], name or DEFAULT_WEIGHTS[HUB_ENTRIES[entry]])
    if arch is not None and is_weights_name(str(weights)):
        return get_weights(arch, str(weights))
    return next((entry for entry in REGISTRY.values() if str(weights) in entry.urls), None)
