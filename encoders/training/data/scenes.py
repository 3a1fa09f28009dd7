"""The built-in "scenes" world: small COCO-like pictures whose contents are known exactly.

Each image is 64x64 RGB and shows one *setting* with 1-5 *objects* standing left to right on
its ground:

- settings: station (platform, rails and sleepers), street (road with lane markings, pavements),
  park (grass, sandy path), water (lake or harbour with waves, sandy shore).
- 12 categories: person, train, bus, car, bicycle, dog, cat, bench, tree, bird, boat, horse.
  Supercategories: animal = dog|cat|bird|horse, vehicle = car|bus|train|bicycle|boat.
- Each setting has its own plausible categories and how often they appear (WEIGHTS): trains
  only at a station (at most one, on the rails), boats only on water, horses only in parks,
  cars and buses on the street. WAITING_SHARE of station scenes are "people waiting for a
  train": a train plus 2-4 persons on the platform.
- Vehicles and animals carry a named colour (CATEGORY_COLOURS); persons wear random clothes,
  trees and benches have no colour attribute. Sizes vary by +-30%, positions jitter, and the
  background gets a random tint and faint pixel noise.

A `Scene` records everything captions may talk about (setting; per object category, colour, x,
y, size); captions.py turns scenes into sentences whose truth is checked against these records.
Everything is drawn from one `random.Random` per image, so a (seed, index) pair fully decides
the image, and splits are just different seeds.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from encoders.training.data.sprites import BACKGROUNDS, BASE_WIDTH, SPRITES, Pen

logger = logging.getLogger(__name__)

SIZE = 64  # image side in pixels
CATEGORIES = ("person", "train", "bus", "car", "bicycle", "dog", "cat", "bench", "tree", "bird",
              "boat", "horse")
SUPERCATEGORIES = {"animal": ("dog", "cat", "bird", "horse"),
                   "vehicle": ("car", "bus", "train", "bicycle", "boat")}
WHATS = CATEGORIES + tuple(SUPERCATEGORIES)  # everything a caption can count
MEMBERS = {**{c: frozenset([c]) for c in CATEGORIES},
           **{s: frozenset(cs) for s, cs in SUPERCATEGORIES.items()}}
SETTINGS = ("station", "street", "park", "water")

COLOURS = {"red": (200, 35, 35), "blue": (35, 70, 205), "green": (35, 150, 50),
           "yellow": (235, 205, 35), "white": (240, 240, 236), "black": (28, 28, 30),
           "brown": (125, 75, 35), "orange": (240, 135, 25), "gray": (128, 128, 132)}
CATEGORY_COLOURS = {
    "train": ("red", "blue", "white", "yellow"),
    "bus": ("red", "yellow", "blue", "white", "green"),
    "car": ("red", "blue", "white", "black", "yellow", "green"),
    "bicycle": ("red", "blue", "black", "yellow", "green"),
    "boat": ("white", "red", "blue", "yellow"),
    "dog": ("brown", "black", "white"),
    "cat": ("black", "white", "orange", "gray"),
    "bird": ("red", "blue", "yellow", "black"),
    "horse": ("brown", "black", "white"),
}
FIXED_RGB = {"tree": (45, 125, 45), "bench": (140, 90, 45)}  # colourless categories
CLOTHES = tuple(COLOURS.values())  # persons' clothes: drawn, but not an attribute

WEIGHTS = {  # relative frequency of each category per setting; absent = never there
    "station": {"person": 5, "train": 2.5, "bench": 1.5, "dog": 0.8, "bird": 0.8,
                "bicycle": 0.6, "cat": 0.4},
    "street": {"car": 4, "person": 3.5, "bus": 2, "bicycle": 1.5, "dog": 1.2, "tree": 1,
               "cat": 0.5, "bird": 0.5, "bench": 0.4},
    "park": {"person": 3.5, "dog": 3, "tree": 2.5, "bench": 1.5, "bird": 1.5, "horse": 1.5,
             "cat": 1, "bicycle": 1},
    "water": {"boat": 4, "person": 2, "bird": 2, "dog": 1, "tree": 0.8, "bench": 0.6},
}
CAPS = {"train": 1, "bus": 2, "bench": 2, "tree": 3, "boat": 3, "horse": 3}  # max per scene
GROUND = {  # (lowest, highest) ground-line y per category; "*" = every other category
    "station": {"train": (36, 36), "*": (46, 63)},
    "street": {"car": (44, 56), "bus": (44, 55), "bicycle": (44, 56), "tree": (33, 36),
               "bench": (34, 36), "*": (59, 63)},
    "park": {"*": (30, 62)},
    "water": {"boat": (30, 47), "*": (54, 63)},
}
N_OBJECTS_WEIGHTS = (2, 3, 3, 2, 1)  # for 1, 2, 3, 4, 5 objects
WAITING_SHARE = 0.45
SIZE_RANGE = (0.7, 1.3)

# Faint per-pixel noise: crops of a fixed bank are much cheaper than fresh noise per image.
_NOISE = np.random.default_rng(0).integers(-4, 5, size=(4, SIZE + 16, SIZE + 16, 3),
                                           dtype=np.int16)


@dataclass(frozen=True)
class SceneObject:
    category: str        # one of CATEGORIES
    colour: str | None   # a COLOURS name, or None for categories without a colour attribute
    x: int               # horizontal centre, pixels
    y: int               # ground line (bottom of the sprite), pixels
    size: float          # scale around the category's base size, in SIZE_RANGE


@dataclass(frozen=True)
class Scene:
    setting: str                        # one of SETTINGS
    objects: tuple[SceneObject, ...]    # sorted left to right

    def count(self, what: str, colour: str | None = None) -> int:
        """How many objects are a `what` (category or supercategory) of that colour (any)."""
        members = MEMBERS[what]
        return sum(o.category in members and (colour is None or o.colour == colour)
                   for o in self.objects)


def image_rng(seed: int, index: int) -> random.Random:
    # A string seed is hashed (sha512) by random.Random: stable across runs and platforms.
    return random.Random(f"scenes:{seed}:{index}")


def sample_scene(rng: random.Random) -> Scene:
    setting = rng.choice(SETTINGS)
    cats = _sample_categories(setting, rng)
    rng.shuffle(cats)
    objects = [_place(c, k, len(cats), setting, rng) for k, c in enumerate(cats)]
    return Scene(setting, tuple(sorted(objects, key=lambda o: o.x)))


def _sample_categories(setting: str, rng: random.Random) -> list[str]:
    n = rng.choices(range(1, 6), weights=N_OBJECTS_WEIGHTS)[0]
    cats = []
    if setting == "station" and rng.random() < WAITING_SHARE:
        cats = ["train"] + ["person"] * rng.randint(2, 4)
    names, weights = zip(*WEIGHTS[setting].items())
    while len(cats) < n:  # terminates: every setting has persons, capped at 5 > n - 1
        c = rng.choices(names, weights=weights)[0]
        if cats.count(c) < CAPS.get(c, 5):
            cats.append(c)
    return cats


def _place(category: str, slot: int, n_slots: int, setting: str,
           rng: random.Random) -> SceneObject:
    colours = CATEGORY_COLOURS.get(category)
    colour = rng.choice(colours) if colours else None
    size = round(rng.uniform(*SIZE_RANGE), 2)
    slot_w = SIZE / n_slots
    x = (slot + 0.5) * slot_w + rng.uniform(-slot_w / 4, slot_w / 4)
    half = min(BASE_WIDTH[category] * size / 2, SIZE / 2)
    x = min(max(x, half), SIZE - half)  # keep long sprites (trains, buses) inside the frame
    ground = GROUND[setting]
    y = rng.randint(*ground.get(category, ground["*"]))
    return SceneObject(category, colour, int(round(x)), y, size)


def render_scene(scene: Scene, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE))
    BACKGROUNDS[scene.setting](ImageDraw.Draw(img), [rng.randrange(SIZE) for _ in range(12)])
    img = _tint_and_noise(img, rng)
    draw = ImageDraw.Draw(img)
    for o in sorted(scene.objects, key=lambda o: o.y):  # far (higher up) first, near on top
        facing = rng.choice((-1, 1))
        SPRITES[o.category](Pen(draw, o.x, o.y, o.size, facing), _object_rgb(o, rng))
    return img


def _tint_and_noise(img: Image.Image, rng: random.Random) -> Image.Image:
    tint = np.array([rng.randint(-10, 10) for _ in range(3)], dtype=np.int16)
    k, dy, dx = rng.randrange(len(_NOISE)), rng.randrange(16), rng.randrange(16)
    arr = np.asarray(img, dtype=np.int16) + tint + _NOISE[k, dy:dy + SIZE, dx:dx + SIZE]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _object_rgb(o: SceneObject, rng: random.Random) -> tuple[int, int, int]:
    if o.colour is not None:
        base = COLOURS[o.colour]
    else:
        base = rng.choice(CLOTHES) if o.category == "person" else FIXED_RGB[o.category]
    return tuple(min(255, max(0, v + rng.randint(-12, 12))) for v in base)
