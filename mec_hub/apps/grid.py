"""One picture of search results: each query in its own row, followed by its neighbours.

Layout (all in pixels): ``rows`` rows of ``columns`` tiles. Each tile is ``tile x tile``, with a
``caption`` strip under it, and ``margin`` between tiles and around the picture, so the size is

    width  = margin + columns * (tile + margin)
    height = margin + rows * (tile + caption + margin)

Images are fitted inside their tile without distortion. A path that is missing or cannot be
decoded gets a grey tile that says so, rather than failing the whole picture.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from mec_hub.data.images import ImageDecodeError, decode_image
from mec_hub.fileio import atomic_write

TILE = 128
MARGIN = 8
CAPTION = 16
BACKGROUND = (255, 255, 255)
MISSING = (160, 160, 160)
QUERY_FRAME = (220, 60, 40)


@dataclass(frozen=True)
class Cell:
    """One tile: an image (``None`` when not found) and the text under it."""

    image: Path | None
    caption: str
    is_query: bool = False


def grid_size(
    rows: int, columns: int, *, tile: int = TILE, margin: int = MARGIN, caption: int = CAPTION
) -> tuple[int, int]:
    """``(width, height)`` of a grid (see the module docstring)."""
    return margin + columns * (tile + margin), margin + rows * (tile + caption + margin)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _tile_image(path: Path | None, tile: int) -> tuple[Image.Image, str | None]:
    """The image fitted in a ``tile`` square, or a grey tile and what went wrong. Decoded by
    ``decode_image`` (the one decode path: regular files only, the pixel limit, EXIF, RGB)."""
    if path is None or not path.is_file():
        return Image.new("RGB", (tile, tile), MISSING), "not found"
    try:
        image = decode_image(path)
    except ImageDecodeError:  # the picture goes on without it
        return Image.new("RGB", (tile, tile), MISSING), "unreadable"
    fitted = ImageOps.contain(image, (tile, tile), method=Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (tile, tile), BACKGROUND)
    canvas.paste(fitted, ((tile - fitted.width) // 2, (tile - fitted.height) // 2))
    return canvas, None


def draw_grid(
    cells: Sequence[Sequence[Cell]], *, tile: int = TILE, margin: int = MARGIN, caption: int = CAPTION
) -> Image.Image:
    """The grid of ``cells`` (one sequence per row; rows shorter than the longest are left blank)."""
    if tile < 8:
        raise ValueError(f"tile must be at least 8 pixels, got {tile}")
    columns = max((len(row) for row in cells), default=0)
    picture = Image.new("RGB", grid_size(len(cells), columns, tile=tile, margin=margin, caption=caption), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    font = _font(max(8, caption - 4))
    for r, row in enumerate(cells):
        top = margin + r * (tile + caption + margin)
        for c, cell in enumerate(row):
            left = margin + c * (tile + margin)
            image, problem = _tile_image(cell.image, tile)
            picture.paste(image, (left, top))
            if problem:
                note = _fit_text(draw, problem, font, tile - 4)
                draw.text((left + tile // 2, top + tile // 2), note, fill=(255, 255, 255), font=font, anchor="mm")
            if cell.is_query:
                draw.rectangle((left - 2, top - 2, left + tile + 1, top + tile + 1), outline=QUERY_FRAME, width=2)
            text = _fit_text(draw, cell.caption, font, tile)
            draw.text((left, top + tile + 2), text, fill=(0, 0, 0), font=font)
    return picture


def save_picture(picture: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Write atomically, in the format the file name says (PNG when it says none Pillow knows)."""
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    return atomic_write(path, lambda tmp: picture.save(tmp, format=image_format))
