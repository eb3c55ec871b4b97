"""Decoding odd and broken files to RGB (mec_hub.data.images), checked against independent references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mec_hub.data.images import ImageDecodeError, decode_image, to_rgb
from tests.support.embedding import read_manifest


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def test_every_manifest_file_decodes_or_fails_as_pillow_measured(odd_images_dir: Path):
    # The manifest's `loads` column is Pillow's own verdict at default settings (open + load).
    for row in read_manifest(odd_images_dir):
        path = odd_images_dir / row["file"]
        if row["loads"] == "yes":
            image = decode_image(path)
            assert image.mode == "RGB", row["file"]
            width, height = (int(v) for v in row["size"].split("x"))
            assert sorted(image.size) == sorted((width, height)), row["file"]
        else:
            with pytest.raises(ImageDecodeError) as info:
                decode_image(path)
            assert info.value.reason and "Traceback" not in info.value.reason


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("empty.jpg", "empty file (0 bytes)"),
        ("not_an_image.jpg", "not an image file"),
        ("broken.png", "corrupt PNG file"),
        ("truncated.png", "truncated image data"),
        ("truncated_progressive.jpg", "truncated image data"),
        ("decompression_bomb.gif", "decompression bomb: 4364696535 pixels exceeds the limit"),
        # Pillow only warns for this one (1x..2x its limit); here the limit is a limit.
        ("huge_width_header.bmp", "decompression bomb: 151587072 pixels exceeds the limit"),
    ],
)
def test_failure_reasons_are_plain_sentences(odd_images_dir: Path, name: str, words: str):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(odd_images_dir / name)
    assert words in info.value.reason


def test_missing_file_reason(tmp_path: Path):
    with pytest.raises(ImageDecodeError, match="file not found"):
        decode_image(tmp_path / "gone.png")


def test_pixel_limit_follows_pillow_setting(odd_images_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    with pytest.raises(ImageDecodeError, match="decompression bomb: 16384 pixels exceeds the limit of 10000"):
        decode_image(odd_images_dir / "rgb.tif")  # 128 x 128


def test_lab_is_converted_not_reinterpreted(odd_images_dir: Path):
    # lab.tif and rgb.tif are the same picture (Pillow's "hopper") stored as CIE L*a*b* and as RGB.
    reference = pixels(Image.open(odd_images_dir / "rgb.tif").convert("RGB"))
    converted = pixels(decode_image(odd_images_dir / "lab.tif"))
    assert np.abs(converted - reference).mean() < 4
    raw_channels = pixels(Image.open(odd_images_dir / "lab.tif")).reshape(reference.shape)
    assert np.abs(raw_channels - reference).mean() > 30  # what a channel reinterpretation would give


def test_exif_orientation_is_applied(odd_images_dir: Path):
    # exif_orientation_6.jpg is hopper stored rotated, with EXIF Orientation=6 to undo it.
    reference = pixels(Image.open(odd_images_dir / "rgb.tif").convert("RGB"))
    decoded = pixels(decode_image(odd_images_dir / "exif_orientation_6.jpg"))
    stored = pixels(Image.open(odd_images_dir / "exif_orientation_6.jpg").convert("RGB"))
    assert np.abs(decoded - reference).mean() < 8  # JPEG noise only
    assert np.abs(stored - reference).mean() > 40


def test_grey_palette_and_bitmap_modes_match_their_rgb_twin(odd_images_dir: Path):
    reference = pixels(Image.open(odd_images_dir / "rgb.tif").convert("RGB"))
    assert np.abs(pixels(decode_image(odd_images_dir / "rgb24.bmp")) - reference).max() == 0
    assert np.abs(pixels(decode_image(odd_images_dir / "rle8_palette.bmp")) - reference).mean() < 6
    grey = pixels(decode_image(odd_images_dir / "gray.jpg"))
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])


def test_transparency_is_composited_over_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque: kept
    rgba[0, 1] = (10, 20, 30, 0)  # transparent: white
    rgba[1, 0] = (0, 0, 0, 128)  # half: halfway to white
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert all(abs(int(v) - 127) <= 1 for v in out[1, 0])


def test_palette_transparency_key_is_composited(odd_images_dir: Path):
    with Image.open(odd_images_dir / "palette_trns.png") as image:
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
    decoded = np.asarray(decode_image(odd_images_dir / "palette_trns.png"))
    assert (alpha == 0).any()
    assert (decoded[alpha == 0] == 255).all()


def test_sixteen_bit_is_scaled_by_its_nominal_range(odd_images_dir: Path):
    with Image.open(odd_images_dir / "gray16.tif") as image:
        raw = np.asarray(image).astype(np.float64)
    decoded = pixels(decode_image(odd_images_dir / "gray16.tif"))[..., 0]
    np.testing.assert_allclose(decoded, np.rint(raw * 255 / 65535), atol=0)
    # Pillow's own I;16 -> L conversion clips instead of scaling: everything over 255 turns white.
    with Image.open(odd_images_dir / "gray16.tif") as image:
        assert (np.asarray(image.convert("L")) == 255).all()


def test_float_images_are_stretched_from_their_range(odd_images_dir: Path):
    with Image.open(odd_images_dir / "float32.tif") as image:
        raw = np.asarray(image).astype(np.float64)
    assert raw.min() < 0  # not in [0, 1]: stretched from min..max
    decoded = pixels(decode_image(odd_images_dir / "float32.tif"))[..., 0]
    expected = np.rint((raw - raw.min()) * 255 / (raw.max() - raw.min()))
    np.testing.assert_allclose(decoded, expected, atol=0)
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    assert list(np.asarray(to_rgb(unit))[0, :, 0]) == [0, 128, 255]


def test_multi_frame_files_use_the_first_frame(odd_images_dir: Path):
    with Image.open(odd_images_dir / "animated_trns.gif") as image:
        first = np.asarray(to_rgb(image.copy()))
        image.seek(5)
        later = np.asarray(to_rgb(image.convert("RGBA")))
    decoded = np.asarray(decode_image(odd_images_dir / "animated_trns.gif"))
    assert np.array_equal(decoded, first)
    assert not np.array_equal(decoded, later)
