"""Small PNG charts drawn with Pillow (no plotting library needed), and the one check every
chart option (`--plot`, `--show`) makes before any work is done: a run must not compute for
minutes and then fail to write its picture."""
from __future__ import annotations

from pathlib import Path

from core.atomic import atomic_write
from core.errors import PcmeError


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
              ymax: float = 1.0, size: tuple[int, int] = (640, 360)) -> Path:
    """Vertical bars in [0, ymax], one per value, labelled underneath."""
    from PIL import Image, ImageDraw

    check_png_path(path)
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 50, w - 20, 40, h - 40
    d.text((left, 12), title, fill="black")
    d.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = bottom - frac * (bottom - top)
        d.line([(left - 4, y), (left, y)], fill="black")
        d.text((8, y - 6), f"{frac * ymax:.2f}", fill="black")
    slot = (right - left) / max(1, len(values))
    for i, (v, lab) in enumerate(zip(values, labels)):
        x0 = left + i * slot + slot * 0.15
        x1 = left + (i + 1) * slot - slot * 0.15
        y = bottom - max(0.0, min(v / ymax, 1.0)) * (bottom - top)
        d.rectangle([x0, y, x1, bottom], fill=(70, 110, 190))
        d.text((x0, y - 14), f"{v:.2f}", fill="black")
        d.text((x0, bottom + 6), lab, fill="black")
    return save_png(img, path)
