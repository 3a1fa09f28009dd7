"""COCO-like captions for scenes, each with the exact predicate it asserts.

Every caption is built from the scene's true contents at one *level* of specificity:

    setting      "a street scene", "a view of a lake"
    super        "an animal in a park", "vehicles on the road"
    object       "a bus on a street"
    count        "two people at the station", "a group of people in a park", "a single tree"
    colour       "a red car on the road", "two white boats on the water"
    pair         "a red car next to a dog", "a person with two dogs in the park"
    waiting      "people waiting for a train", "two people waiting for a train on a platform"

An image gets 5 captions from different levels ("waiting" always, when a station scene has a
train and a person). The predicate is built alongside the words, not parsed back from them, so
`parse_caption(text) == predicate` is a real check of both. Words are lowercase GloVe words,
no punctuation. Meaning and count semantics: see predicates.py.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from encoders.training.data.predicates import (  # re-exported: the caption API lives here
    NUMBERS, PLURAL, SINGULAR, Constraint, Predicate, holds, match_matrix, parse_caption)
from encoders.training.data.scenes import SUPERCATEGORIES, Scene

logger = logging.getLogger(__name__)

__all__ = ["Caption", "make_captions", "Constraint", "Predicate", "holds", "match_matrix",
           "parse_caption", "CAPTIONS_PER_IMAGE"]

CAPTIONS_PER_IMAGE = 5
PLACES = {
    "station": ["on a platform", "at a train station", "at the station", "on a station platform",
                "at a railway station"],
    "street": ["on a street", "on the road", "on a city street", "in the street"],
    "park": ["in a park", "in a grassy field", "on the grass", "in the park"],
    "water": ["by the water", "near a lake", "at the harbor", "by a lake"],
}
BOAT_PLACES = ["on the water", "on a lake", "in a harbor"]  # boats float, others stand by it
SCENE_ONLY = {
    "station": ["a train station", "a view of a train station", "a station platform",
                "a picture of a railway station"],
    "street": ["a street scene", "a view of a city street", "a picture of a road",
               "a city street"],
    "park": ["a park scene", "a view of a grassy field", "a picture of a park", "a grassy field"],
    "water": ["a view of a lake", "a harbor scene", "a picture of the waterfront",
              "a view of the water"],
}
FRAMES = ["{}"] * 6 + ["a picture of {}", "a photo of {}"]
NUMBER_WORDS = {n: w for w, n in NUMBERS.items()}
CONNECTORS = ["next to", "with", "and", "near"]


@dataclass(frozen=True)
class Caption:
    text: str             # lowercase words separated by single spaces
    predicate: Predicate  # exactly what the text asserts
    level: str            # which level of specificity it was written at (see module doc)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _some(what: str, rng: random.Random, colour: str | None = None) -> tuple[str, Constraint]:
    """'a dog' / 'an orange cat': at least one."""
    words = ([colour] if colour else []) + [rng.choice(SINGULAR[what])]
    return f"{_article(words[0])} {' '.join(words)}", Constraint(what, colour)


def _counted(what: str, k: int, rng: random.Random,
             colour: str | None = None) -> tuple[str, Constraint]:
    """A phrase true when there are k of them: exact ('two people') or looser ('people',
    'a group of people')."""
    col = f"{colour} " if colour else ""
    plural = rng.choice(PLURAL[what])
    number = rng.choice(["one", "a single"]) if k == 1 else NUMBER_WORDS[k]
    noun = rng.choice(SINGULAR[what] if k == 1 else PLURAL[what])
    options = [(f"{number} {col}{noun}", Constraint(what, colour, "==", k))]
    if k >= 2:
        options.append((f"{col}{plural}", Constraint(what, colour, ">=", 2)))
    if k >= 3:
        options.append((f"a group of {col}{plural}", Constraint(what, colour, ">=", 3)))
    return rng.choice(options)


def _finish(scene: Scene, rng: random.Random, level: str, phrase: str,
            constraints: list[Constraint], p_place: float, boat: bool = False) -> Caption:
    setting = None
    if rng.random() < p_place:
        setting = scene.setting
        phrase += " " + rng.choice(BOAT_PLACES if boat else PLACES[setting])
    return Caption(rng.choice(FRAMES).format(phrase), Predicate(setting, tuple(constraints)), level)


def _categories(scene: Scene) -> list[str]:
    return sorted({o.category for o in scene.objects})


def _setting(scene: Scene, rng: random.Random) -> Caption:
    return Caption(rng.choice(SCENE_ONLY[scene.setting]), Predicate(scene.setting), "setting")


def _super(scene: Scene, rng: random.Random) -> Caption | None:
    present = [s for s in SUPERCATEGORIES if scene.count(s)]
    if not present:
        return None
    what = rng.choice(present)
    k = scene.count(what)
    phrase, c = _some(what, rng) if rng.random() < 0.5 else _counted(what, k, rng)
    return _finish(scene, rng, "super", phrase, [c], 0.8)


def _object(scene: Scene, rng: random.Random) -> Caption:
    what = rng.choice(_categories(scene))
    phrase, c = _some(what, rng)
    return _finish(scene, rng, "object", phrase, [c], 0.8, boat=what == "boat")


def _count(scene: Scene, rng: random.Random) -> Caption:
    what = rng.choice(_categories(scene))
    phrase, c = _counted(what, scene.count(what), rng)
    return _finish(scene, rng, "count", phrase, [c], 0.7, boat=what == "boat")


def _colour(scene: Scene, rng: random.Random) -> Caption | None:
    coloured = [o for o in scene.objects if o.colour]
    if not coloured:
        return None
    o = rng.choice(coloured)
    k = scene.count(o.category, o.colour)
    if k >= 2 and rng.random() < 0.5:
        phrase, c = _counted(o.category, k, rng, o.colour)
    else:
        phrase, c = _some(o.category, rng, o.colour)
    return _finish(scene, rng, "colour", phrase, [c], 0.6, boat=o.category == "boat")


def _pair(scene: Scene, rng: random.Random) -> Caption | None:
    cats = _categories(scene)
    if len(cats) < 2:
        return None
    parts = [_pair_part(scene, what, rng) for what in rng.sample(cats, 2)]
    phrase = f"{parts[0][0]} {rng.choice(CONNECTORS)} {parts[1][0]}"
    return _finish(scene, rng, "pair", phrase, [parts[0][1], parts[1][1]], 0.5)


def _pair_part(scene: Scene, what: str, rng: random.Random) -> tuple[str, Constraint]:
    k = scene.count(what)
    if k >= 2 and rng.random() < 0.5:
        return _counted(what, k, rng)
    colours = [o.colour for o in scene.objects if o.category == what and o.colour]
    return _some(what, rng, rng.choice(colours) if colours and rng.random() < 0.5 else None)


def _waiting(scene: Scene, rng: random.Random) -> Caption | None:
    k = scene.count("person")
    if scene.setting != "station" or not scene.count("train") or not k:
        return None
    people, c = _some("person", rng) if k == 1 else _counted("person", k, rng)
    phrase = f"{people} {rng.choice(['waiting for a train', 'waiting for the train'])}"
    if rng.random() < 0.5:
        phrase += " " + rng.choice(PLACES["station"])
    return Caption(phrase, Predicate("station", (c, Constraint("train"))), "waiting")


LEVELS = [_setting, _super, _object, _count, _colour, _pair]


def _candidates(scene: Scene, rng: random.Random):
    levels = LEVELS[:]
    rng.shuffle(levels)
    for f in levels:
        yield f(scene, rng)
    for _ in range(60):  # plain scenes (one tree) need several tries for distinct sentences
        yield rng.choice(LEVELS)(scene, rng)


def make_captions(scene: Scene, rng: random.Random, n: int = CAPTIONS_PER_IMAGE) -> list[Caption]:
    """n distinct true captions, spread over levels: one per level first, then more of any."""
    out = [c for c in [_waiting(scene, rng)] if c is not None]
    for c in _candidates(scene, rng):
        if len(out) == n:
            break
        if c is not None and all(c.text != o.text for o in out):
            out.append(c)
    while len(out) < n:  # scenes too plain for n distinct sentences (not seen in practice)
        out.append(out[len(out) % len(out)])
    return out
