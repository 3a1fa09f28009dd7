"""Any decoded PIL image as 8-bit RGB, the way a person would see it: the one place colour
modes are reconciled, shared by the model's image loader (encoders/model/images.py) and the
contact sheet that shows hits (engine/contact_sheet.py), so both see the same picture.

  alpha (RGBA, LA, palette with transparency)   flattened on white, not on black: cut-out
                     photos and logos keep arbitrary colours in their transparent pixels
  16-bit greyscale   scaled to 8 bits (PIL's convert would clip everything above 255 to white)
  anything else (palette, CMYK, greyscale, YCbCr, LAB ...)   PIL's conversion to RGB
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        return _wide_grey_to_rgb(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _wide_grey_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer) greyscale -> 8 bits by the type's range, not by clipping."""
    a = np.asarray(img)
    top = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) <= 65535 else float(a.max())
    grey = np.clip(a.astype(np.float64) * (255.0 / top), 0, 255).round().astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")
