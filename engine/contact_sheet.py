"""A PNG contact sheet of a query's hits: `python cli.py query "..." --show results.png`.

Text query (hits are images): a grid of thumbnails, each captioned with rank, score and
uncertainty (mean σ², written "var": the default font has no σ).
Image query (hits are captions): the query image on the left, the ranked captions as text lines
on the right. Hit images that cannot be opened become grey tiles saying so, because one moved
file should not cost the user the whole sheet.
"""
from __future__ import annotations

import logging
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from core.charts import check_png_path, save_png
from core.errors import PcmeError
from core.pixels import to_rgb

logger = logging.getLogger(__name__)

LABEL_H = 34          # pixels under each thumbnail for two lines of text
LINE_H = 16           # pixels per caption line
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


def contact_sheet(result, path: str | Path, thumb: int = 128, cols: int = 5) -> Path:
    """Draw `result` (engine.search.QueryResult) into the PNG at `path` (written atomically)."""
    path = check_png_path(path, "--show")
    if thumb < 16 or cols < 1:
        raise PcmeError(f"contact sheet: thumb must be >= 16 and cols >= 1, got {thumb}, {cols}")
    if result.modality == "image":
        sheet = _image_grid(result, thumb, cols)
    else:
        sheet = _caption_list(result, 2 * thumb)
    save_png(sheet, path, "--show")
    logger.info("contact sheet: %s (%dx%d)", path, *sheet.size)
    return path


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def fit(img: Image.Image, size: int) -> Image.Image:
    """Scale to fit `size`x`size`: small images grow by a whole factor with nearest-neighbour
    (64-px scenes stay crisp), large ones shrink smoothly."""
    factor = size // max(img.width, img.height)
    if factor >= 1:
        return img.resize((img.width * factor, img.height * factor), Image.NEAREST)
    img = img.copy()
    img.thumbnail((size, size))
    return img


def _tile(item: str, size: int) -> Image.Image:
    """The hit image scaled to fit `size`x`size`, or a grey tile when it cannot be opened.
    Upright and with transparency on white, as the model saw it (core.pixels)."""
    tile = Image.new("RGB", (size, size), (200, 200, 200))
    try:
        with Image.open(item) as img:
            img = fit(to_rgb(ImageOps.exif_transpose(img)), size)
            tile.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        logger.warning("contact sheet: cannot open %s", item)
        ImageDraw.Draw(tile).text((4, size // 2 - 6), "unreadable", fill=INK, font=_font())
    return tile


def _image_grid(result, thumb: int, cols: int) -> Image.Image:
    hits = result.results
    cols = max(1, min(cols, len(hits)))
    rows = max(1, -(-len(hits) // cols))
    header = LINE_H + 8
    sheet = Image.new("RGB", (cols * (thumb + 8) + 8, header + rows * (thumb + LABEL_H + 8)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 4), _fit(f"query: {result.query}   score: {result.score}   "
                           f"query var {result.query_uncertainty:.4f}", sheet.width), fill=INK, font=_font())
    for i, hit in enumerate(hits):
        x = 8 + (i % cols) * (thumb + 8)
        y = header + (i // cols) * (thumb + LABEL_H + 8)
        sheet.paste(_tile(hit.item, thumb), (x, y))
        draw.text((x, y + thumb + 2), f"#{hit.rank}  {hit.score:.3f}", fill=INK, font=_font())
        draw.text((x, y + thumb + 2 + LINE_H), f"var {hit.uncertainty:.4f}", fill=INK, font=_font())
    return sheet


def _caption_list(result, size: int) -> Image.Image:
    """The query image, then one line (wrapped) per caption hit: rank, score, var, text."""
    lines = [f"query var {result.query_uncertainty:.4f}   score: {result.score}"]
    for hit in result.results:
        head = f"#{hit.rank}  {hit.score:.3f}  var {hit.uncertainty:.4f}  "
        wrapped = textwrap.wrap(head + hit.item, 80) or [head]
        lines += [wrapped[0]] + ["      " + w for w in wrapped[1:]]
    width = size + 24 + 8 * 82
    height = max(size + 16, 8 + LINE_H * len(lines) + 8)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    sheet.paste(_tile(result.query, size), (8, 8))
    draw = ImageDraw.Draw(sheet)
    for j, line in enumerate(lines):
        draw.text((size + 16, 8 + j * LINE_H), line, fill=INK, font=_font())
    return sheet


def _fit(text: str, width: int) -> str:
    """Cut a header line to roughly what fits (the default font is ~6-7 px per character)."""
    limit = max(10, width // 7)
    return text if len(text) <= limit else text[:limit - 1] + "…"
