"""The one way an image file becomes pixels: training readers, `encode --images` and query
images all call `load_image`, so a photo looks the same to the model wherever it comes from.

Real photo folders hold more than clean 8-bit RGB JPEGs; each quirk is handled once, here or
(colour modes, which the contact sheet shares) in core/pixels.py:
  EXIF orientation   rotated/flipped upright (phones store portrait shots sideways + a tag)
  alpha (RGBA, LA, palette with transparency)   flattened on white, not on black: cut-out
                     photos and logos have black (0, 0, 0) in their transparent pixels
  palette, CMYK, greyscale, YCbCr, LAB ...      converted to RGB
  16-bit greyscale   scaled to 8 bits (PIL's convert would clip everything above 255 to white)
  animated GIF/WebP  the first frame
  huge images        refused above PIL's pixel limit (set once by core.process at the edge)
  truncated/corrupt  refused: an ImageError names the file (callers skip or report it)
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import PcmeError
from core.pixels import to_rgb

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageError(PcmeError):
    """One image file that cannot be used; the message starts with the path."""


def load_image(path: str | Path, size_hint: int | None = None) -> Image.Image:
    """`path` as an upright 8-bit RGB image. `size_hint`: the side the caller will resize to,
    which lets JPEG decode at a reduced scale (4-8x faster on camera photos)."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # PIL only warns between 1x and 2x its pixel limit
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.seek(0)  # animated GIF/WebP/TIFF: the first frame
                if size_hint and img.format == "JPEG":
                    img.draft("RGB", (size_hint, size_hint))  # never below size_hint
                img.load()
                return to_rgb(ImageOps.exif_transpose(img))
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{path}: image larger than {Image.MAX_IMAGE_PIXELS} pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt data
        raise ImageError(f"{path}: cannot decode ({e})") from None


def list_images(root: str | Path) -> list[Path]:
    """Every image file under `root` (recursive, by suffix, case-insensitive), sorted so ids
    are stable across runs; hidden files and folders are left out."""
    root = Path(root)
    if not root.is_dir():
        raise PcmeError(f"--images {root}: folder not found")
    found = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(found)
