"""Image decoding (franca.data.image_decoding): transparency composited onto a background, 16/32-bit images scaled to
8 bits, and the option's path from the config, the eval flags and the demo to the datasets. Expected pixels are
computed here from the arrays the test images were made of, in floating point."""

import argparse
import io
import pickle
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from franca import demo
from franca.data.datasets import decode_image
from franca.data.image_decoding import ImageDecoding, parse_background, parse_max_value, to_rgb
from franca.data.loaders import make_dataset
from franca.eval.lib.common import add_backbone_arguments, make_eval_dataset, resolve_decoding
from franca.train.config import load_config
from franca.utils.config_schema import ConfigError

CORNFLOWER = (100, 149, 237)
DARK_GREEN = (0, 100, 0)
RNG = np.random.default_rng(0)


def _blend(colour: np.ndarray, alpha: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Straight alpha over an opaque background, per pixel, in float64, rounded to the nearest integer."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    out = colour.astype(np.float64) * a + np.asarray(background, dtype=np.float64) * (1.0 - a)
    return np.round(out).astype(np.uint8)


def _round_half_up(values: np.ndarray) -> np.ndarray:
    return np.floor(np.asarray(values, dtype=np.float64) + 0.5).astype(np.uint8)


def _png_round_trip(image: Image.Image, **save_options) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_options)
    return Image.open(io.BytesIO(buffer.getvalue()))


def _decode_without_warnings(image: Image.Image, **options) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = to_rgb(image, **options)
    assert result.mode == "RGB"
    return np.asarray(result)


def _rgba_arrays() -> tuple[np.ndarray, np.ndarray]:
    colour = RNG.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    alpha = RNG.integers(0, 256, (6, 7), dtype=np.uint8)
    alpha[0, :3] = (0, 255, 128)
    return colour, alpha


@pytest.mark.parametrize("background", [(255, 255, 255), CORNFLOWER])
def test_rgba_is_alpha_blended_onto_the_background(background):
    colour, alpha = _rgba_arrays()
    image = _png_round_trip(Image.fromarray(np.dstack([colour, alpha])))
    assert image.mode == "RGBA"
    got = _decode_without_warnings(image, background=background)
    assert np.array_equal(got, _blend(colour, alpha, background))
    assert tuple(got[0, 0]) == background  # alpha 0: the background alone, not the stored colour


@pytest.mark.parametrize("background", [(255, 255, 255), CORNFLOWER])
def test_gray_with_alpha_is_blended_per_channel(background):
    gray = RNG.integers(0, 256, (5, 5), dtype=np.uint8)
    alpha = RNG.integers(0, 256, (5, 5), dtype=np.uint8)
    image = _png_round_trip(Image.fromarray(np.dstack([gray, alpha])))
    assert image.mode == "LA"
    expected = _blend(np.repeat(gray[..., None], 3, axis=2), alpha, background)
    assert np.array_equal(_decode_without_warnings(image, background=background), expected)


@pytest.mark.parametrize("background", [(255, 255, 255), CORNFLOWER])
def test_palette_with_transparency_bytes_shows_the_background_not_the_stored_green(background):
    palette = np.array([DARK_GREEN, (255, 0, 0), (0, 0, 255), (250, 200, 10)], dtype=np.uint8)
    palette_alpha = np.array([0, 128, 255, 40], dtype=np.uint8)
    indices = RNG.integers(0, 4, (8, 8), dtype=np.uint8)
    indices[0, 0] = 0
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.ravel().tolist())
    image = _png_round_trip(image, transparency=palette_alpha.tobytes())
    assert image.mode == "P" and isinstance(image.info["transparency"], bytes)
    got = _decode_without_warnings(image, background=background)  # raises on PIL's palette warning
    assert np.array_equal(got, _blend(palette[indices], palette_alpha[indices], background))
    assert tuple(got[0, 0]) == background
    with pytest.warns(UserWarning, match="Palette images with Transparency"):
        assert tuple(np.asarray(image.convert("RGB"))[0, 0]) == DARK_GREEN  # what the original decoding showed


def test_gray_with_a_transparent_value_shows_the_background_there():
    gray = RNG.integers(0, 256, (6, 6), dtype=np.uint8)
    gray[2, :] = 7
    image = _png_round_trip(Image.fromarray(gray), transparency=7)
    assert image.mode == "L" and image.info["transparency"] == 7
    expected = _blend(np.repeat(gray[..., None], 3, axis=2), np.where(gray == 7, 0, 255), CORNFLOWER)
    assert np.array_equal(_decode_without_warnings(image, background=CORNFLOWER), expected)


def test_opaque_rgba_equals_its_rgb_and_rgb_is_unchanged():
    colour, _ = _rgba_arrays()
    opaque = Image.fromarray(np.dstack([colour, np.full(colour.shape[:2], 255, np.uint8)]))
    assert np.array_equal(_decode_without_warnings(opaque, background=(0, 0, 0)), colour)
    assert np.array_equal(_decode_without_warnings(Image.fromarray(colour), background=(0, 0, 0)), colour)


def test_sixteen_bit_png_ramp_spans_the_8_bit_range():
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    image = _png_round_trip(Image.fromarray(ramp))
    assert image.mode == "I;16"
    assert np.asarray(image.convert("RGB")).mean() > 254  # the original decoding: nearly white
    got = _decode_without_warnings(image)
    assert abs(got.mean() - 127.5) < 0.01
    assert np.array_equal(got[..., 0], _round_half_up(ramp * 255.0 / 65535.0))
    assert np.array_equal(got[..., 0], got[..., 2])


@pytest.fixture
def microscopy_tiff(tmp_path) -> tuple[Path, np.ndarray]:
    """A 12-bit-camera-like frame, 100..3000 with a few bright spots, saved as a 16-bit TIFF."""
    frame = RNG.integers(100, 1500, (32, 40)).astype(np.uint16)
    frame[0, 0], frame[5, 9], frame[20, 30] = 100, 3000, 2900
    path = tmp_path / "cells.tif"
    Image.fromarray(frame).save(path)
    return path, frame


def test_sixteen_bit_tiff_is_scaled_by_its_own_range(microscopy_tiff):
    path, frame = microscopy_tiff
    got = np.asarray(decode_image(path))
    assert got.min() == 0 and got.max() == 255
    expected = _round_half_up((frame - 100.0) * 255.0 / 2900.0)
    assert np.array_equal(got[..., 1], expected)


def test_declared_maximum_scales_every_image_alike(microscopy_tiff):
    path, frame = microscopy_tiff
    got = np.asarray(decode_image(path, ImageDecoding(max_value=4095.0)))
    assert np.array_equal(got[..., 0], _round_half_up(frame * 255.0 / 4095.0))
    assert got.max() == round(3000 * 255 / 4095)


def test_big_endian_sixteen_bit_tiff(tmp_path):
    values = np.array([[0, 1000], [2000, 4000]], dtype=">u2")
    path = tmp_path / "big_endian.tif"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16B"
    assert np.asarray(decode_image(path))[..., 0].tolist() == [[0, 64], [128, 255]]


def test_thirty_two_bit_integer_image_with_negative_values():
    values = np.array([[-1000, 0], [500, 3000]], dtype=np.int32)
    image = Image.fromarray(values)
    assert image.mode == "I"
    expected_range = _round_half_up((values + 1000.0) * 255.0 / 4000.0)
    assert np.array_equal(_decode_without_warnings(image)[..., 0], expected_range)
    expected_declared = _round_half_up(np.clip(values, 0, 2000) * 255.0 / 2000.0)
    assert np.array_equal(_decode_without_warnings(image, max_value=2000.0)[..., 0], expected_declared)


def test_float_image_counts_nan_and_inf_as_its_minimum():
    values = np.array([[0.25, 0.5, np.nan], [1.25, np.inf, -np.inf]], dtype=np.float32)
    image = Image.fromarray(values)
    assert image.mode == "F"
    got = _decode_without_warnings(image)[..., 0]
    assert got.tolist() == [[0, 64, 0], [255, 0, 0]]  # (v - 0.25) · 255 / 1.0; non-finite → 0.25 → 0


def test_constant_image_becomes_black_or_follows_the_declared_maximum():
    flat = Image.fromarray(np.full((3, 4), 1234, dtype=np.uint16))
    assert _decode_without_warnings(flat).max() == 0
    assert np.all(_decode_without_warnings(flat, max_value=4095.0) == round(1234 * 255 / 4095))
    all_nan = Image.fromarray(np.full((2, 2), np.nan, dtype=np.float32))
    assert _decode_without_warnings(all_nan).max() == 0


def test_sixteen_bit_gray_with_a_transparent_value():
    values = np.array([[5, 1000], [2000, 5]], dtype=np.uint16)
    image = _png_round_trip(Image.fromarray(values), transparency=5)
    assert image.mode == "I;16" and image.info["transparency"] == 5
    got = _decode_without_warnings(image, background=CORNFLOWER)
    assert tuple(got[0, 0]) == tuple(got[1, 1]) == CORNFLOWER
    assert got[0, 1].tolist() == [0] * 3 and got[1, 0].tolist() == [255] * 3  # range of the opaque: 1000..2000


@pytest.mark.parametrize(
    "text, colour",
    [("white", (255, 255, 255)), ("Black", (0, 0, 0)), ("#6495ed", CORNFLOWER), (" 100, 149,237 ", CORNFLOWER)],
)
def test_background_option_forms(text, colour):
    assert parse_background(text) == colour


@pytest.mark.parametrize("text", ["", "blue", "#12345", "#12345G", "256,0,0", "1,2", "-1,0,0"])
def test_bad_background_names_the_value_and_the_forms(text):
    with pytest.raises(ValueError, match=r"background colour .* is not a colour; write white, black, #RRGGBB"):
        parse_background(text)


def test_max_value_option():
    assert parse_max_value(0) is None and parse_max_value(4095) == 4095.0
    for bad in (-1, float("nan"), float("inf"), "abc"):
        with pytest.raises(ValueError, match="must be 0"):
            parse_max_value(bad)
    with pytest.raises(ValueError, match="max_value=0 must be positive"):
        to_rgb(Image.new("I;16", (2, 2)), max_value=0)


def _transparent_folder(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """An image folder of one RGBA PNG and one opaque 16-bit PNG ramp; returns the RGBA arrays."""
    colour, alpha = _rgba_arrays()
    folder.mkdir()
    Image.fromarray(np.dstack([colour, alpha])).save(folder / "a_logo.png")
    Image.fromarray(np.arange(0, 65536, 4369, dtype=np.uint16).reshape(4, 4)).save(folder / "b_depth.png")
    return colour, alpha


def test_config_option_reaches_the_images_of_make_dataset(tmp_path):
    colour, alpha = _transparent_folder(tmp_path / "images")
    cfg = load_config(overrides=['train.alpha_background="#6495ED"', "train.image_max_value=65535"])
    decoding = ImageDecoding.from_options(cfg.train.alpha_background, cfg.train.image_max_value)
    dataset = make_dataset(f"ImageFolder:root={tmp_path / 'images'}", decoding=decoding)
    spawned_copy = pickle.loads(pickle.dumps(dataset))  # what a spawned loader worker receives
    for loaded in (dataset, spawned_copy):
        assert np.array_equal(np.asarray(loaded[0][0]), _blend(colour, alpha, CORNFLOWER))
        ramp = np.arange(0, 65536, 4369).reshape(4, 4) * 255.0 / 65535.0
        assert np.array_equal(np.asarray(loaded[1][0])[..., 0], _round_half_up(ramp))
    default = make_dataset(f"ImageFolder:root={tmp_path / 'images'}")
    assert np.array_equal(np.asarray(default[0][0]), _blend(colour, alpha, (255, 255, 255)))


def test_segmentation_images_are_composited_and_masks_untouched(tmp_path):
    colour, alpha = _rgba_arrays()
    for sub in ("images", "masks"):
        (tmp_path / "train" / sub).mkdir(parents=True)
    Image.fromarray(np.dstack([colour, alpha])).save(tmp_path / "train" / "images" / "x.png")
    mask = RNG.integers(0, 3, colour.shape[:2], dtype=np.uint8)
    Image.fromarray(mask).save(tmp_path / "train" / "masks" / "x.png")
    dataset = make_dataset(f"SegFolder:root={tmp_path}:split=train", decoding=ImageDecoding(CORNFLOWER))
    image, target = dataset[0]
    assert np.array_equal(np.asarray(image), _blend(colour, alpha, CORNFLOWER))
    assert np.array_equal(target.numpy(), mask)


@pytest.mark.parametrize("override", ["train.alpha_background=purple", "train.alpha_background=1,2,300"])
def test_bad_background_in_the_config_names_the_key(override):
    with pytest.raises(ConfigError, match=r"config key train\.alpha_background=.* is invalid: .*#RRGGBB"):
        load_config(overrides=[override])


def test_negative_max_value_in_the_config_names_the_key():
    with pytest.raises(ConfigError, match=r"config key train\.image_max_value=-4\.0 is invalid"):
        load_config(overrides=["train.image_max_value=-4"])


def test_eval_flags_reach_the_evaluation_dataset(tmp_path, capsys):
    colour, alpha = _transparent_folder(tmp_path / "images")
    parser = argparse.ArgumentParser()
    add_backbone_arguments(parser)
    base = ["--weights", "w", "--output-dir", str(tmp_path)]
    args = parser.parse_args(base + ["--alpha-background", "100,149,237", "--image-max-value", "65535"])
    unrecorded = SimpleNamespace(input_decoding=None)  # a checkpoint that records no decoding
    decoding, _ = resolve_decoding(args, unrecorded)
    assert decoding == ImageDecoding(CORNFLOWER, 65535.0)
    assert resolve_decoding(parser.parse_args(base), unrecorded)[0] == ImageDecoding()
    dataset = make_eval_dataset(f"ImageFolder:root={tmp_path / 'images'}", 8, 8, decoding)
    assert dataset.image_decoding == ImageDecoding(CORNFLOWER, 65535.0)
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--alpha-background", "teal"])
    assert "background colour 'teal' is not a colour" in capsys.readouterr().err


def test_demo_photo_is_composited_onto_its_flag_colour(tmp_path):
    colour, alpha = _rgba_arrays()
    path = tmp_path / "sticker.png"
    Image.fromarray(np.dstack([colour, alpha])).save(path)
    photo = demo.load_photo(str(path), ImageDecoding(CORNFLOWER))
    assert np.array_equal(np.asarray(photo), _blend(colour, alpha, CORNFLOWER))
    with pytest.raises(SystemExit):
        demo.main(["--image", str(path), "--alpha-background", "nope"])
