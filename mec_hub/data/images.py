"""Decode any image file Pillow can read into an RGB ``PIL.Image``, or say in plain words why not.

What every file goes through, in order:

0. Only a regular file (or a symbolic link to one) is read. A FIFO, socket or device fails at
   once, without being read: it is opened with ``O_NONBLOCK`` (so that opening a FIFO cannot wait
   for a writer) and checked with ``fstat`` on the descriptor that is then read, so a file swapped
   for a FIFO after a first check cannot make decoding hang either.
1. ``Image.open`` with the pixel limit enforced: an image whose header claims more than
   ``PIL.Image.MAX_IMAGE_PIXELS`` pixels fails as a decompression bomb. Pillow itself only warns
   between 1x and 2x that limit; here the warning counts as a failure, so the limit means what it
   says (raise it with ``mec-embed --max-pixels`` or by setting ``PIL.Image.MAX_IMAGE_PIXELS``).
2. A full decode (``.load()``) with ``ImageFile.LOAD_TRUNCATED_IMAGES`` left False, so truncated
   files fail instead of coming back half grey. Multi-frame files (GIF, WebP, TIFF) use frame 0.
3. The EXIF orientation is applied (``ImageOps.exif_transpose``). An unreadable EXIF block does
   not fail an image whose pixels decode; it is used unrotated.
4. Conversion to 8-bit RGB:

   - transparency (``RGBA``, ``LA``, ``PA``, palette or grey images with a transparency key) is
     composited over white, the way a viewer shows the image on a page;
   - ``I;16`` (16-bit) and ``I`` (32-bit) integers are scaled from their nominal range
     (0..65535 -> 0..255); ``I`` values outside 0..65535 are stretched from min..max;
   - ``F`` (float) images in [0, 1] are scaled by 255, others stretched from their finite
     min..max (NaN -> 0);
   - ``LAB`` goes through LittleCMS (CIE L*a*b* D50 -> sRGB), not a channel reinterpretation;
   - ``CMYK``, ``YCbCr``, ``HSV``, ``1``, ``L`` and ``P`` use Pillow's own conversion.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mec_hub.errors import MecHubError
from mec_hub.fileio import NotRegularFileError, open_regular_file

# The file names a folder walk takes as images, in training, embedding and evaluation alike:
# raster formats Pillow decodes (HEIC/AVIF need plugins: kept, so that they show up as failures
# with a reason instead of vanishing). Extensions Pillow registers for containers that are often
# not images (.h5, .mpg, .pdf, .ps ...) are deliberately left out. Lower case; a tuple, so that
# ``name.lower().endswith(IMAGE_EXTENSIONS)`` works as well as ``ext in IMAGE_EXTENSIONS``.
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".png", ".apng", ".gif", ".bmp", ".dib", ".tif",
    ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".pfm", ".tga", ".ico", ".icns", ".qoi",
    ".jp2", ".j2k", ".jpx", ".jpf", ".j2c", ".psd", ".pcx", ".sgi", ".avif", ".heic", ".heif",
)  # fmt: skip
# How decoding works, recorded in FEATS.meta.json so that a reader knows what the model saw.
DECODING_VERSION = 1
WHITE = (255, 255, 255)
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_EXIF_ORIENTATION = 0x0112
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")

# First bytes of common formats, to tell "a corrupt PNG" from "not an image at all".
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"BM", "BMP"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (8, b"WEBP", "WebP"),
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypheix", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
    (4, b"ftypavif", "AVIF"),
    (0, b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
)


class ImageDecodeError(MecHubError):
    """A file that cannot be turned into an RGB image; ``reason`` is one plain sentence."""

    def __init__(self, reason: str, path: str | None = None) -> None:
        self.reason, self.path = reason, path
        super().__init__(f"{path}: {reason}" if path else reason)


def sniff_format(header: bytes) -> str | None:
    """Format named by a file's first bytes, or None when they match no known image format."""
    for offset, magic, name in _SIGNATURES:
        if header[offset : offset + len(magic)] == magic:
            return name
    return None


def _open_failure_reason(header: bytes) -> str:
    if not header:
        return "empty file (0 bytes)"
    fmt = sniff_format(header)
    if fmt in ("HEIC", "HEIF", "AVIF"):
        return f"{fmt} image, a format this Pillow installation cannot read"
    if fmt is not None:
        return f"corrupt {fmt} file (its header cannot be read)"
    return "not an image file (unrecognised format)"


def _bomb_reason(message: str) -> str:
    found = _BOMB_PIXELS.search(message)
    pixels = found.group(1) if found else "too many"
    return (
        f"decompression bomb: {pixels} pixels exceeds the limit of {Image.MAX_IMAGE_PIXELS} "
        "(for a trusted file, raise PIL.Image.MAX_IMAGE_PIXELS or mec-embed --max-pixels)"
    )


def _load_failure_reason(exc: BaseException) -> str:
    message = str(exc)
    if "truncated" in message:
        return "truncated image data (the file ends early)"
    if isinstance(exc, MemoryError):
        return "out of memory while decoding"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"cannot read the file ({exc.strerror})"
    return f"corrupt image data ({message or type(exc).__name__})"


def _open_and_load(source: str | os.PathLike[str] | bytes) -> Image.Image:
    """Open (a path, or the bytes of a file), enforce the pixel limit, decode fully; every failure
    becomes an ``ImageDecodeError``."""
    try:
        with warnings.catch_warnings():
            # Pillow warns about odd metadata in many real files; none of it matters here, except
            # its pixel-limit warning, which is made an error (filters added last match first).
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Our own file object: Pillow leaves it to us, so it is closed even when decoding fails,
            # and the decoded pixels stay valid after it is.
            with io.BytesIO(source) if isinstance(source, bytes) else open_regular_file(source) as fh:
                try:
                    image = Image.open(fh)
                except UnidentifiedImageError:
                    fh.seek(0)
                    raise ImageDecodeError(_open_failure_reason(fh.read(16))) from None
                image.load()
    except ImageDecodeError:
        raise
    except NotRegularFileError as exc:
        raise ImageDecodeError(str(exc)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(_bomb_reason(str(exc))) from None
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError("is a folder, not a file") from None
    except PermissionError:
        raise ImageDecodeError("permission denied") from None
    except Exception as exc:  # Pillow's plugins raise OSError, ValueError, SyntaxError, struct.error ...
        raise ImageDecodeError(_load_failure_reason(exc)) from None
    return image


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # an unreadable EXIF block: treat the image as upright
        return 1


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """The image as a viewer shows it (rotated/flipped as its EXIF says); unchanged if that fails."""
    if _exif_orientation(image) in (1, 0):
        return image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ImageOps.exif_transpose(image)
    except Exception:
        return image


def _composite_over_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (*WHITE, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Map 16-bit, 32-bit or float samples to 0..255 (see the module docstring for the rules)."""
    if mode == "F":
        data = values.astype(np.float64)
        finite = np.isfinite(data)
        if not finite.any():
            return np.zeros(data.shape, np.uint8)
        lo, hi = float(data[finite].min()), float(data[finite].max())
        if lo >= 0.0 and hi <= 1.0:
            scaled = data * 255.0
        elif hi > lo:
            scaled = (data - lo) * (255.0 / (hi - lo))
        else:
            scaled = np.zeros_like(data)
        scaled[~finite] = 0.0
    else:
        data = values.astype(np.int64)
        lo, hi = int(data.min()), int(data.max())
        if lo >= 0 and hi <= 65535:
            scaled = data * (255.0 / 65535.0)
        else:
            scaled = (data - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros(data.shape)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image)
    grey = Image.fromarray(_to_uint8(values, image.mode), "L")
    key = image.info.get("transparency")
    if isinstance(key, int | float) and not isinstance(key, bool):
        alpha = np.where(values == key, 0, 255).astype(np.uint8)
        rgba = Image.merge("RGBA", (grey, grey, grey, Image.fromarray(alpha, "L")))
        return _composite_over_white(rgba)
    return grey.convert("RGB")


def _lab_to_rgb(image: Image.Image) -> Image.Image:
    try:
        from PIL import ImageCms

        transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        return ImageCms.applyTransform(image, transform)  # type: ignore[return-value]
    except ImportError:
        raise ImageDecodeError("LAB image, but this Pillow has no colour management (LittleCMS)") from None


def has_transparency(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or (image.mode in ("P", "L", "RGB", "1") and "transparency" in image.info)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB version of any Pillow mode (transparency over white; rules in the module docstring)."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_rgb(image)
    if mode == "LAB":
        return _lab_to_rgb(image)
    if has_transparency(image):
        return _composite_over_white(image.convert("RGBA"))
    return image.convert("RGB")


def prepare_image(image: Image.Image) -> Image.Image:
    """What the model sees of an already open image: EXIF orientation applied, then RGB."""
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageDecodeError(f"image has no pixels ({width} x {height})")
    return to_rgb(apply_exif_orientation(image))


def decode_image(path: str | os.PathLike[str]) -> Image.Image:
    """Read ``path`` into an RGB image, or raise ``ImageDecodeError`` whose reason says why not."""
    return _decode(path)


def decode_image_bytes(data: bytes) -> Image.Image:
    """The bytes of an image file (e.g. a tar member) as an RGB image, by the same rules as
    ``decode_image`` (steps 1 to 4); ``ImageDecodeError`` says why not."""
    return _decode(bytes(data))


def _decode(source: str | os.PathLike[str] | bytes) -> Image.Image:
    image = _open_and_load(source)
    try:
        return prepare_image(image)
    except ImageDecodeError:
        raise
    except MemoryError:
        raise ImageDecodeError("out of memory while converting to RGB") from None
    except Exception as exc:
        raise ImageDecodeError(f"cannot convert {image.mode} image to RGB ({exc})") from None


def describe_decoding() -> dict[str, Any]:
    """The decoding rules in force, for the meta file."""
    return {
        "version": DECODING_VERSION,
        "library": f"Pillow {Image.__version__}",
        "max_pixels": Image.MAX_IMAGE_PIXELS,
        "exif_orientation": "applied",
        "frames": "first",
        "transparency": "composited over white",
        "high_bit_depth": "16-bit by nominal range; float [0,1] x 255, else min..max",
    }


def image_header(data: bytes) -> tuple[int, int, str]:
    """``(width, height, mode)`` of the image file whose bytes are ``data``, from its header alone: no
    pixel is decoded, so a caller can refuse a size before ``decode_image_bytes`` allocates it.
    ``ImageDecodeError`` when the header cannot be read (or claims over twice the pixel limit)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the pixel-limit warning included: the caller sets its own limit
            with Image.open(io.BytesIO(data)) as image:
                return image.width, image.height, image.mode
    except UnidentifiedImageError:
        raise ImageDecodeError(_open_failure_reason(bytes(data[:16]))) from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(_bomb_reason(str(exc))) from None
    except Exception as exc:  # Pillow's plugins raise OSError, ValueError, SyntaxError, struct.error ...
        raise ImageDecodeError(_load_failure_reason(exc)) from None
