"""Small PNG charts drawn with Pillow (no plotting library needed), and the one check every
chart option (`--plot`, `--show`) makes before any work is done: a run must not compute for
minutes and then fail to write its picture."""
from __future__ import annotations

import unicodedata
from pathlib import Path

from core.atomic import atomic_write
from core.errors import PcmeError

# Pillow's built-in font has no Greek letters, superscripts or arrows (they render as empty
# boxes), and no system font can be assumed: chart text is written in plain ASCII.
_ASCII = {"Σσ²": "sum sigma^2", "σ²": "sigma^2", "Σ": "sum ", "σ": "sigma", "μ": "mu",
          "²": "^2", "→": "->", "←": "<-", "−": "-", "–": "-", "—": "-", "≥": ">=", "≤": "<=",
          "×": "x", "·": "*"}


def ascii_text(text: str) -> str:
    """`text` with every character the chart font can draw: known symbols spelled out, accents
    dropped, anything else replaced by '?'."""
    for sym, plain in _ASCII.items():
        text = text.replace(sym, plain)
    text = unicodedata.normalize("NFKD", text)
    return "".join(c if c.isascii() else "?" for c in text if not unicodedata.combining(c))


def draw_text(draw, xy, text: str, fill="black", anchor: str = "la") -> None:
    """Draw `text` (made ASCII) with Pillow's built-in font; `anchor` as in Pillow
    ("la" left-top-ish, "ma" centred, "ra" right)."""
    draw.text(xy, ascii_text(text), fill=fill, anchor=anchor)


def check_png_path(path: str | Path, option: str = "--plot") -> Path:
    """The path a chart will be written to, checked now: a .png name in an existing folder."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise PcmeError(f"{option} {path}: must be a .png file name")
    if not path.parent.is_dir():
        raise PcmeError(f"{option} {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise PcmeError(f"{option} {path}: is a directory")
    return path


def save_png(img, path: str | Path, option: str = "--plot") -> Path:
    """Write a PIL image as PNG in one piece (temporary sibling + rename)."""
    path = check_png_path(path, option)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def bar_chart(values: list[float], labels: list[str], title: str, path: str | Path,
              ymax: float = 1.0, size: tuple[int, int] = (720, 400), xlabel: str = "",
              ylabel: str = "") -> Path:
    """Vertical bars in [0, ymax], one per value, labelled underneath; every text inside the
    picture."""
    from PIL import Image, ImageDraw

    check_png_path(path)
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, w - 20, 60, h - 60
    draw_text(d, (w // 2, 12), title, anchor="ma")
    if ylabel:
        draw_text(d, (8, 36), ylabel)
    d.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = bottom - frac * (bottom - top)
        d.line([(left - 4, y), (left, y)], fill="black")
        draw_text(d, (left - 8, y - 6), f"{frac * ymax:.2f}", anchor="ra")
    slot = (right - left) / max(1, len(values))
    for i, (v, lab) in enumerate(zip(values, labels)):
        x0 = left + i * slot + slot * 0.15
        x1 = left + (i + 1) * slot - slot * 0.15
        y = bottom - max(0.0, min(v / ymax, 1.0)) * (bottom - top)
        d.rectangle([x0, y, x1, bottom], fill=(70, 110, 190))
        draw_text(d, ((x0 + x1) / 2, max(top - 14, y - 14)), f"{v:.2f}", anchor="ma")
        draw_text(d, ((x0 + x1) / 2, bottom + 6), lab, anchor="ma")
    if xlabel:
        draw_text(d, (w // 2, h - 22), xlabel, anchor="ma")
    return save_png(img, path)
