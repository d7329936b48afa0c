"""How a decoded image file becomes the 8-bit RGB image every dataset returns (training.md, "Image decoding").

* **Transparency** (modes RGBA, LA, PA, RGBa, La, and any image with a ``transparency`` entry in ``image.info``:
  palette, grayscale or RGB PNGs with a tRNS chunk, GIFs) is alpha-composited onto a solid ``background`` colour,
  per pixel ``round(colour · α + background · (1 − α))`` with α = alpha / 255. A plain ``convert("RGB")`` would
  instead show whatever colour is stored under the transparent pixels (often black or dark green).
* **High bit depth** single-channel images (modes ``I;16``, ``I;16B``, ``I;16L``, ``I;16N``: 16-bit PNG and TIFF;
  ``I``: 32-bit integer; ``F``: 32-bit float) are scaled linearly to 0..255. By default by the image's own range
  (``(value − min) · 255 / (max − min)``; a constant image becomes 0, since every pixel is its minimum); with
  ``max_value`` by a declared maximum (``value · 255 / max_value``, clipped to 0..255; e.g. 4095 for a 12-bit
  camera), so that all images of a dataset share one scale. Results are rounded to the nearest integer, halves up.
  Non-finite pixels (NaN, ±inf in float images) count as the image's smallest finite value (0 if none is finite).
  A ``transparency`` value of a 16-bit grayscale PNG makes those pixels show the background, and they do not count
  in the image's range.
* **Multi-channel 16-bit** images: Pillow opens 16-bit RGB and RGBA PNGs and TIFFs already reduced to 8 bits (the
  high byte, i.e. a declared maximum of 65535), so neither the range scaling nor ``max_value`` applies to them.
* Everything else (L, P, 1, CMYK, YCbCr, ...) is converted by Pillow as before.

8-bit images are never rescaled: ``max_value`` only concerns the high-bit-depth modes.

* **The decode-size cap**: an image whose header says it has more than ``max_pixels`` pixels raises
  :class:`ImageTooLargeError` before any pixel is decoded (datasets then skip it as unreadable). Pillow's own
  decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) is raised to the cap when the cap is larger, so the cap rules.
"""

import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

Colour = tuple[int, int, int]

WHITE: Colour = (255, 255, 255)
NAMED_COLOURS: dict[str, Colour] = {"white": WHITE, "black": (0, 0, 0)}
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
BACKGROUND_FORMS = (
    "white, black, #RRGGBB (hex; quote it in YAML files and overrides, where # starts a comment) or R,G,B (three "
    "integers 0-255)"
)
_HEX_COLOUR = re.compile(r"#([0-9a-fA-F]{6})")
_TRIPLE = re.compile(r"\s*(\d{1,3})\s*,\s*(\d{1,3})\s*,\s*(\d{1,3})\s*")
DEFAULT_MAX_MEGAPIXELS = 100.0


class ImageTooLargeError(ValueError):
    """An image with more pixels than the decode-size cap."""


def parse_background(value: str) -> Colour:
    """``"white"``, ``"black"``, ``"#RRGGBB"`` or ``"R,G,B"`` → an (R, G, B) tuple of 0..255 integers."""
    text = str(value).strip()
    if text.lower() in NAMED_COLOURS:
        return NAMED_COLOURS[text.lower()]
    hex_match = _HEX_COLOUR.fullmatch(text)
    if hex_match:
        digits = hex_match[1]
        return tuple(int(digits[i : i + 2], 16) for i in (0, 2, 4))
    triple = _TRIPLE.fullmatch(text)
    if triple and all(int(channel) <= 255 for channel in triple.groups()):
        return tuple(int(channel) for channel in triple.groups())
    raise ValueError(f"background colour {value!r} is not a colour; write {BACKGROUND_FORMS}")


def format_background(colour: Colour) -> str:
    """The text form of a colour: its name when it has one (white, black), else ``#rrggbb``."""
    names = {rgb: name for name, rgb in NAMED_COLOURS.items()}
    return names.get(tuple(colour), "#" + "".join(f"{channel:02x}" for channel in colour))


def parse_max_value(value: float) -> float | None:
    """The declared maximum of high-bit-depth pixels: 0 → None (scale each image by its own range), > 0 → value."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number) or number < 0:
        raise ValueError(
            f"image max value {value!r} must be 0 (scale each image by its own range) or a positive pixel value "
            "such as 65535 (16-bit) or 4095 (12-bit)"
        )
    return number or None


def to_rgb(image: Image.Image, background: Colour = WHITE, max_value: float | None = None) -> Image.Image:
    """A new 8-bit RGB image from ``image`` by the rules of the module docstring; ``image`` is not changed."""
    if max_value is not None and not max_value > 0:
        raise ValueError(f"max_value={max_value!r} must be positive, or None to scale each image by its own range")
    if image.mode in HIGH_BIT_DEPTH_MODES:
        image = _high_bit_depth_to_gray(image, max_value)
    if image.has_transparency_data:
        return _composite(_to_rgba(image), background)
    return image.convert("RGB")


def _high_bit_depth_to_gray(image: Image.Image, max_value: float | None) -> Image.Image:
    """An 8-bit L image (LA when the image has a transparency value) scaled as the module docstring says."""
    raw = np.asarray(image)
    transparent_value = image.info.get("transparency")
    opaque = np.ones(raw.shape, dtype=bool) if transparent_value is None else raw != transparent_value
    gray = Image.fromarray(_scale_to_8_bits(_finite_or_minimum(raw.astype(np.float64)), opaque, max_value))
    if transparent_value is None:
        return gray
    return Image.merge("LA", (gray, Image.fromarray(np.where(opaque, 255, 0).astype(np.uint8))))


def _scale_to_8_bits(values: np.ndarray, opaque: np.ndarray, max_value: float | None) -> np.ndarray:
    """``values`` linearly to 0..255 (uint8), by ``max_value`` or else by the range of the opaque pixels."""
    if max_value is not None:
        scaled = np.clip(values, 0.0, max_value) * 255.0 / max_value
    else:
        shown = values[opaque] if opaque.any() else values
        low, high = shown.min(), shown.max()
        scaled = np.clip((values - low) * 255.0 / (high - low), 0.0, 255.0) if high > low else np.zeros_like(values)
    return np.floor(scaled + 0.5).astype(np.uint8)


def _finite_or_minimum(values: np.ndarray) -> np.ndarray:
    """``values`` with NaN and ±inf replaced by the smallest finite value (0 when none is finite)."""
    finite = np.isfinite(values)
    if finite.all():
        return values
    floor = values[finite].min() if finite.any() else 0.0
    return np.where(finite, values, floor)


def _to_rgba(image: Image.Image) -> Image.Image:
    """Straight-alpha RGBA; Pillow converts the premultiplied La through LA, and turns a ``transparency`` entry into
    alpha (converting to RGBA is also what its palette warning asks for)."""
    if image.mode == "La":
        image = image.convert("LA")
    return image.convert("RGBA")


def _composite(rgba: Image.Image, background: Colour) -> Image.Image:
    """``round(colour · α + background · (1 − α))`` per pixel: Pillow's masked paste computes exactly this, rounding
    (colour · alpha + background · (255 − alpha)) / 255 to the nearest integer, in C."""
    canvas = Image.new("RGB", rgba.size, background)
    canvas.paste(rgba, mask=rgba)
    return canvas


@dataclass(frozen=True)
class ImageDecoding:
    """The decoding options of a dataset: an attribute of the dataset object, so that DataLoader workers, forked or
    spawned, receive them with it."""

    background: Colour = WHITE
    max_value: float | None = None
    max_pixels: int = int(DEFAULT_MAX_MEGAPIXELS * 1e6)

    @classmethod
    def from_options(
        cls,
        alpha_background: str = "white",
        image_max_value: float = 0.0,
        image_max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
    ) -> "ImageDecoding":
        """From the option values (``train.alpha_background``, ``train.image_max_value``; 0 = per-image range,
        ``train.image_max_megapixels``)."""
        background, max_value = parse_background(alpha_background), parse_max_value(image_max_value)
        return cls(background, max_value, int(image_max_megapixels * 1e6))

    def open(self, stream) -> Image.Image:
        """``Image.open`` of a file object, refused with :class:`ImageTooLargeError` when its header says it has more
        than ``max_pixels`` pixels (nothing is decoded yet)."""
        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < self.max_pixels:
            Image.MAX_IMAGE_PIXELS = self.max_pixels
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the cap below is the rule
            try:
                image = Image.open(stream)
            except Image.DecompressionBombError as err:  # over twice Pillow's limit, refused while opening
                raise ImageTooLargeError(f"{err} {self._fix}") from None
        width, height = image.size
        if width * height > self.max_pixels:
            image.close()
            size = f"{width}x{height} = {width * height / 1e6:.0f} megapixels"
            raise ImageTooLargeError(f"the image is {size}. {self._fix}")
        return image

    @property
    def _fix(self) -> str:
        return (
            f"That is above the decode-size cap of {self.max_pixels / 1e6:g} megapixels (train.image_max_megapixels), "
            "so it is not decoded; raise the cap to use it, or downscale the file"
        )

    @classmethod
    def from_record(cls, record: dict) -> "ImageDecoding":
        """From a model's stored ``input_decoding`` (:meth:`to_record`); a missing entry takes the default."""
        return cls.from_options(record.get("alpha_background", "white"), record.get("image_max_value", 0.0))

    def to_record(self) -> dict:
        """The form stored with a model (``backbone_config["input_decoding"]``): the option values."""
        return {"alpha_background": format_background(self.background), "image_max_value": self.max_value or 0.0}

    def describe(self) -> str:
        """One phrase for the console, e.g. ``alpha background white, image max value 0 (each image's range)``."""
        maximum = "0 (each image's range)" if self.max_value is None else f"{self.max_value:g}"
        return f"alpha background {format_background(self.background)}, image max value {maximum}"

    def to_rgb(self, image: Image.Image) -> Image.Image:
        return to_rgb(image, self.background, self.max_value)


DEFAULT_DECODING = ImageDecoding()


def training_decoding(cfg) -> ImageDecoding:
    """How a training run decodes its images (``train.alpha_background``, ``train.image_max_value``,
    ``train.image_max_megapixels``): the training loader, the periodic k-NN, the drift probe and the decoding stored
    with the exported model share it."""
    return ImageDecoding.from_options(
        cfg.train.alpha_background, cfg.train.image_max_value, cfg.train.image_max_megapixels
    )
