"""Pixel drawing for the scenes world: one background per setting and one sprite per category.

Every drawer is a handful of PIL ImageDraw primitives. Sprites are written in their own
coordinates (dx forward along the way the sprite faces, dy up from the ground line, in base
pixels); `Pen` scales and mirrors them, so sprite code never deals with flips or sizes.
Nothing here is random: the caller passes every choice in (colours, facing, layout numbers).
"""
from __future__ import annotations

import logging
from typing import Callable

from PIL import ImageDraw

logger = logging.getLogger(__name__)

RGB = tuple[int, int, int]
DARK: RGB = (35, 35, 40)
WINDOW: RGB = (170, 210, 240)
SKIN: RGB = (230, 190, 150)
SKY: RGB = (140, 190, 235)


def shade(rgb: RGB, k: float) -> RGB:
    """Darker (k < 1) or lighter (k > 1) version of a colour, for details that must stand out."""
    return tuple(min(255, int(v * k)) for v in rgb)


class Pen:
    """Draws at (x, y) = (centre, ground line) with scale s, facing f = +1 (right) or -1 (left)."""

    def __init__(self, draw: ImageDraw.ImageDraw, x: float, y: float, s: float, f: int):
        self.draw, self.x, self.y, self.s, self.f = draw, x, y, s, f

    def pt(self, dx: float, dy: float) -> tuple[float, float]:
        return self.x + self.f * dx * self.s, self.y - dy * self.s

    def box(self, dx0, dy0, dx1, dy1) -> tuple[float, float, float, float]:
        # PIL wants x0 <= x1 and y0 <= y1; mirroring and the upward dy would break that.
        (a, b), (c, d) = self.pt(dx0, dy0), self.pt(dx1, dy1)
        return min(a, c), min(b, d), max(a, c), max(b, d)

    def rect(self, dx0, dy0, dx1, dy1, fill: RGB):
        self.draw.rectangle(self.box(dx0, dy0, dx1, dy1), fill=fill)

    def ellipse(self, dx0, dy0, dx1, dy1, fill: RGB | None = None, outline: RGB | None = None):
        self.draw.ellipse(self.box(dx0, dy0, dx1, dy1), fill=fill, outline=outline)

    def poly(self, pts, fill: RGB):
        self.draw.polygon([self.pt(*p) for p in pts], fill=fill)

    def line(self, pts, fill: RGB, width: float = 1.0):
        self.draw.line([self.pt(*p) for p in pts], fill=fill, width=max(1, round(width * self.s)))


# --- sprites: base sizes are what the layout code in scenes.py assumes (width in BASE_WIDTH) ---

def person(p: Pen, rgb: RGB):  # small upright figure; rgb = clothes
    p.rect(-1.5, 0, 1.5, 5, (45, 45, 70))
    p.rect(-2.2, 5, 2.2, 10.5, rgb)
    p.ellipse(-1.8, 10.2, 1.8, 14, SKIN)


def train(p: Pen, rgb: RGB):  # long, windows in a row, wheels on the rails
    p.rect(-20, 2, 18, 16, rgb)
    p.poly([(18, 16), (22, 9), (22, 2), (18, 2)], rgb)
    p.rect(-20, 14.5, 18, 16, shade(rgb, 0.6))
    for k in range(6):
        p.rect(-18 + 6 * k, 8, -14 + 6 * k, 12, WINDOW)
    p.rect(18.5, 9.5, 20.5, 12.5, WINDOW)
    for wx in (-15, -10, 8, 13):
        p.ellipse(wx - 1.6, 0, wx + 1.6, 3.2, DARK)


def bus(p: Pen, rgb: RGB):  # tall box, two wheels, big windows, a door
    p.rect(-13, 2, 13, 16, rgb)
    for k in range(4):
        p.rect(-11 + 5.3 * k, 9, -7.5 + 5.3 * k, 14, WINDOW)
    p.rect(10.5, 8, 12.5, 14, WINDOW)
    p.rect(7, 3, 9.5, 8.5, shade(rgb, 0.6))
    for wx in (-7.5, 7.5):
        p.ellipse(wx - 2.5, 0, wx + 2.5, 5, DARK)


def car(p: Pen, rgb: RGB):  # low body, cabin on top, two wheels
    p.rect(-8, 2, 8, 6, rgb)
    p.poly([(-5, 6), (-3, 9.5), (3, 9.5), (5, 6)], rgb)
    p.poly([(-4, 6.4), (-2.6, 9), (-0.4, 9), (-0.4, 6.4)], WINDOW)
    p.poly([(0.4, 6.4), (0.4, 9), (2.6, 9), (4, 6.4)], WINDOW)
    for wx in (-5, 5):
        p.ellipse(wx - 1.6, 0, wx + 1.6, 3.2, DARK)


def bicycle(p: Pen, rgb: RGB):  # two ring wheels joined by a coloured frame
    p.ellipse(-6.5, 0, -1, 5.5, outline=DARK)
    p.ellipse(1, 0, 6.5, 5.5, outline=DARK)
    hub_r, pedal, seat, head, hub_f = (-3.7, 2.7), (0, 2.7), (-1.5, 7), (3, 7.5), (3.7, 2.7)
    p.line([hub_r, seat, pedal, hub_r], rgb)
    p.line([seat, head, hub_f], rgb)
    p.line([pedal, head], rgb)
    p.line([(-2.7, 7.5), (-0.5, 7.5)], DARK)
    p.line([head, (2, 9)], DARK)


def dog(p: Pen, rgb: RGB):  # horizontal body on four legs, head forward, tail up
    for lx in (-3.5, -1.5, 0.7, 2.5):
        p.rect(lx - 0.5, 0, lx + 0.5, 3.5, rgb)
    p.ellipse(-4.5, 2.5, 3.5, 6.5, rgb)
    p.ellipse(2, 4.5, 6, 8.5, rgb)
    p.rect(5, 5, 7.2, 6.7, rgb)
    p.rect(6.5, 5.7, 7.4, 6.6, DARK)
    p.ellipse(2.3, 6.5, 3.8, 9.3, shade(rgb, 0.6))
    p.line([(-4.3, 5.5), (-6.3, 8)], rgb)


def cat(p: Pen, rgb: RGB):  # sitting upright, pointed ears, curled tail
    p.ellipse(-3, 0, 2.2, 5.8, rgb)
    p.ellipse(-0.5, 4.6, 3.6, 8.2, rgb)
    p.poly([(-0.4, 7.3), (0.2, 9.8), (1.3, 7.9)], rgb)
    p.poly([(1.9, 7.9), (3, 9.8), (3.6, 7.3)], rgb)
    p.rect(1.9, 6.3, 2.5, 6.9, DARK)
    p.line([(-3, 1), (-5, 1.5), (-5.5, 4)], rgb)


def bench(p: Pen, rgb: RGB):  # seat plank, backrest plank, dark legs
    for lx in (-5.5, 5.5):
        p.rect(lx - 0.5, 0, lx + 0.5, 3, DARK)
        p.rect(lx - 0.4, 4, lx + 0.4, 5.7, DARK)
    p.rect(-6.5, 3, 6.5, 4.3, rgb)
    p.rect(-6.5, 5.5, 6.5, 7, rgb)


def tree(p: Pen, rgb: RGB):  # trunk and a round crown
    p.rect(-1.3, 0, 1.3, 10, (100, 65, 30))
    p.ellipse(-7, 8, 7, 24, rgb)
    p.ellipse(-4, 14, 2, 21, shade(rgb, 1.25))


def bird(p: Pen, rgb: RGB):  # small round body, head, orange beak
    p.line([(-0.8, 0), (-0.8, 1.5)], DARK)
    p.poly([(-3, 3), (-5, 4.2), (-5, 2.3)], rgb)
    p.ellipse(-3.2, 1, 1.6, 4.3, rgb)
    p.ellipse(0.5, 3, 3.2, 5.7, rgb)
    p.poly([(3, 4.7), (4.6, 4.2), (3, 3.6)], (240, 150, 30))


def boat(p: Pen, rgb: RGB):  # coloured hull on the waterline, cabin, mast and sail
    p.poly([(-10, 4.5), (10, 4.5), (7, 0), (-7, 0)], rgb)
    p.rect(-7, 0, 7, 0.8, shade(rgb, 0.55))
    p.rect(-5, 4.5, 1, 7.5, (215, 215, 205))
    p.rect(-3.5, 5.5, -1.5, 6.7, WINDOW)
    p.line([(3.5, 4.5), (3.5, 15)], DARK)
    p.poly([(4.2, 5.5), (4.2, 15), (9, 5.5)], (245, 240, 220))


def horse(p: Pen, rgb: RGB):  # big body high on four long legs, neck and head up front
    for lx in (-5, -3, 2, 4):
        p.rect(lx - 0.55, 0, lx + 0.55, 7, rgb)
    p.ellipse(-6.5, 5.5, 5, 10.5, rgb)
    p.poly([(2.5, 9), (4.5, 14), (6.5, 13), (4.8, 8)], rgb)
    p.poly([(4.3, 14.2), (6.5, 14.2), (9.2, 11.2), (8, 10.2)], rgb)
    p.line([(3.2, 10.5), (4.5, 14)], shade(rgb, 0.5))
    p.line([(-6.3, 9.5), (-7.8, 4.5)], shade(rgb, 0.5), width=1.5)


SPRITES: dict[str, Callable[[Pen, RGB], None]] = {
    "person": person, "train": train, "bus": bus, "car": car, "bicycle": bicycle, "dog": dog,
    "cat": cat, "bench": bench, "tree": tree, "bird": bird, "boat": boat, "horse": horse,
}
BASE_WIDTH = {"person": 5, "train": 42, "bus": 26, "car": 16, "bicycle": 13, "dog": 13,
              "cat": 9, "bench": 13, "tree": 14, "bird": 10, "boat": 20, "horse": 17}


# --- backgrounds: the ground lines they draw are the GROUND ranges in scenes.py ---

def station(d: ImageDraw.ImageDraw, jitter: list[int]):
    """Sky, canopy pillars, ballast with sleepers and two rails (trains stand at y=36), platform."""
    d.rectangle((0, 0, 63, 26), fill=SKY)
    d.rectangle((0, 0, 63, 4), fill=(95, 95, 105))
    for px in jitter[:2]:
        d.rectangle((px, 5, px + 1, 27), fill=(110, 110, 120))
    d.rectangle((0, 27, 63, 38), fill=(120, 108, 95))
    for x in range(jitter[2] % 4, 64, 4):
        d.rectangle((x, 33, x + 1, 37), fill=(95, 62, 35))
    d.line((0, 34, 63, 34), fill=(195, 195, 205))
    d.line((0, 36, 63, 36), fill=(195, 195, 205))
    d.rectangle((0, 38, 63, 63), fill=(188, 182, 170))
    d.rectangle((0, 38, 63, 39), fill=(235, 205, 40))


def street(d: ImageDraw.ImageDraw, jitter: list[int]):
    """Sky, buildings, back pavement, road with dashed lane markings (y 37-56), front pavement."""
    d.rectangle((0, 0, 63, 30), fill=SKY)
    x = -jitter[0] % 6
    for k, h in enumerate(jitter[1:6]):
        d.rectangle((x, 22 - h % 15, x + 12, 30), fill=(150 - 12 * k, 140 - 8 * k, 135))
        x += 14
    d.rectangle((0, 30, 63, 36), fill=(168, 166, 160))
    d.rectangle((0, 37, 63, 56), fill=(72, 72, 78))
    for x in range(jitter[6] % 10 - 10, 64, 10):
        d.rectangle((x, 46, x + 4, 47), fill=(235, 235, 230))
    d.rectangle((0, 57, 63, 63), fill=(168, 166, 160))


def park(d: ImageDraw.ImageDraw, jitter: list[int]):
    """Sky, a line of distant trees, grass with a sandy path."""
    d.rectangle((0, 0, 63, 21), fill=SKY)
    for k, x in enumerate(range(-jitter[0] % 9 - 9, 64, 9)):
        d.ellipse((x, 14 + k % 3, x + 12, 26), fill=(50, 105, 50))
    d.rectangle((0, 22, 63, 63), fill=(88, 162, 66))
    py = 40 + jitter[1] % 9
    d.polygon([(0, py), (63, py + jitter[2] % 7 - 3), (63, py + 5), (0, py + 5)],
              fill=(205, 185, 135))


def water(d: ImageDraw.ImageDraw, jitter: list[int]):
    """Sky, far shore, water with light wave strokes (boats float at y 30-47), sandy near shore."""
    d.rectangle((0, 0, 63, 16), fill=SKY)
    d.rectangle((0, 17, 63, 20), fill=(90, 130, 70))
    d.rectangle((0, 21, 63, 49), fill=(45, 100, 175))
    for k in range(0, len(jitter) - 1, 2):
        x, y = jitter[k] % 60, 22 + jitter[k + 1] % 26
        d.line((x, y, x + 3, y), fill=(120, 170, 225))
    d.rectangle((0, 50, 63, 63), fill=(215, 196, 146))


BACKGROUNDS = {"station": station, "street": street, "park": park, "water": water}
