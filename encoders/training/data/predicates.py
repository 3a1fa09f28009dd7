"""What a scenes caption means, and exactly which images it is true of.

A caption's meaning is a `Predicate`: an optional setting and a conjunction of `Constraint`s,
each counting the objects of a category or supercategory (optionally of one colour).
Count semantics of the caption language:

    "a dog", "an animal", "the train", "dog"   at least one          (>= 1)
    "dogs", "people", "animals" (no number)     at least two          (>= 2)
    "one dog", "a single dog", "two people",    exactly that many     (== n)
    ... "five cars"
    "a group of people"                         at least three        (>= 3)
    "a red car", "two red cars"                 the count is of cars whose colour is red
    "X next to Y", "X with Y", "X and Y", "X near Y"    both hold (the layout is 1-D, so
                                                        adjacency is not modelled)
    "... waiting for a train"                   a train (>= 1) and the setting is a station
    "on a platform", "in a park", "a street scene", ...  the setting

Counts are over the whole image: "two people" is false when three persons are present.
`holds` evaluates one predicate on one scene in plain Python (the reference); `match_matrix`
does all pairs at once with numpy; `parse_caption` reads any sentence of this language.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np

from encoders.training.data.scenes import COLOURS, MEMBERS, SETTINGS, WHATS, Scene

logger = logging.getLogger(__name__)

OPS = (">=", "==")


@dataclass(frozen=True)
class Constraint:
    what: str                  # category ("dog") or supercategory ("animal")
    colour: str | None = None  # count only objects of this colour; None = any colour
    op: str = ">="             # ">=": at least n; "==": exactly n
    n: int = 1

    def __post_init__(self):
        if self.what not in MEMBERS or self.op not in OPS or \
                (self.colour is not None and self.colour not in COLOURS):
            raise ValueError(f"bad constraint {self}")


@dataclass(frozen=True)
class Predicate:
    setting: str | None                          # one of SETTINGS, or None for any
    constraints: tuple[Constraint, ...] = ()     # all must hold; kept sorted (order is meaningless)

    def __post_init__(self):
        if self.setting is not None and self.setting not in SETTINGS:
            raise ValueError(f"bad setting {self.setting!r}")
        key = lambda c: (c.what, c.colour or "", c.op, c.n)  # noqa: E731
        object.__setattr__(self, "constraints", tuple(sorted(self.constraints, key=key)))

    def to_dict(self) -> dict:
        return {"setting": self.setting,
                "constraints": [[c.what, c.colour, c.op, c.n] for c in self.constraints]}

    @classmethod
    def from_dict(cls, d: dict) -> Predicate:
        return cls(d["setting"], tuple(Constraint(*c) for c in d["constraints"]))


def holds(predicate: Predicate, scene: Scene) -> bool:
    """Plain per-pair evaluation; the reference the vectorised match_matrix is tested against."""
    if predicate.setting is not None and predicate.setting != scene.setting:
        return False
    for c in predicate.constraints:
        k = scene.count(c.what, c.colour)
        if not (k == c.n if c.op == "==" else k >= c.n):
            return False
    return True


# --- vectorised ground truth -------------------------------------------------------------

_COLOUR_SLOTS = (None,) + tuple(COLOURS)  # slot 0 = any colour
_FEATURE = {(w, c): i * len(_COLOUR_SLOTS) + j
            for i, w in enumerate(WHATS) for j, c in enumerate(_COLOUR_SLOTS)}
_WHATS_OF = {cat: [w for w in WHATS if cat in MEMBERS[w]] for cat in MEMBERS}


def count_features(scenes: list[Scene]) -> np.ndarray:
    """int16 [n_images, n_features]: objects per (category or supercategory, colour or any)."""
    rows, cols = [], []
    for j, s in enumerate(scenes):
        for o in s.objects:
            for w in _WHATS_OF[o.category]:
                slots = (None,) if o.colour is None else (None, o.colour)
                for c in slots:
                    rows.append(j)
                    cols.append(_FEATURE[(w, c)])
    counts = np.zeros((len(scenes), len(_FEATURE)), dtype=np.int16)
    np.add.at(counts, (np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64)), 1)
    return counts


def match_matrix(predicates: list[Predicate], scenes: list[Scene],
                 block: int = 4096) -> np.ndarray:
    """bool [n_captions, n_images]: predicate i holds for scene j. Exact, same as `holds`.
    Predicates go in blocks so the int16 temporaries stay small on big splits."""
    counts = count_features(scenes)                                      # [N, F]
    setting_ids = np.array([_SETTING_ID[s.setting] for s in scenes], dtype=np.int64)
    out = np.empty((len(predicates), len(scenes)), dtype=bool)
    for start in range(0, len(predicates), block):
        out[start:start + block] = _match_block(predicates[start:start + block], counts,
                                                setting_ids)
    return out


_SETTING_ID = {s: i for i, s in enumerate(SETTINGS)}


def _match_block(predicates: list[Predicate], counts: np.ndarray,
                 setting_ids: np.ndarray) -> np.ndarray:
    want = np.array([-1 if p.setting is None else _SETTING_ID[p.setting] for p in predicates])
    out = (want[:, None] < 0) | (want[:, None] == setting_ids[None, :])   # [P, N]
    width = max((len(p.constraints) for p in predicates), default=0)
    for k in range(width):  # the k-th constraint of every predicate at once
        active = np.array([len(p.constraints) > k for p in predicates])
        cs = [p.constraints[k] if len(p.constraints) > k else Constraint("person")
              for p in predicates]
        feat = np.array([_FEATURE[(c.what, c.colour)] for c in cs], dtype=np.int64)
        n = np.array([c.n for c in cs], dtype=np.int16)[:, None]
        exact = np.array([c.op == "==" for c in cs])[:, None]
        got = counts[:, feat].T                                          # [P, N]
        out &= np.where(exact, got == n, got >= n) | ~active[:, None]
    return out


# --- parsing the caption language --------------------------------------------------------

SINGULAR = {c: [c] for c in WHATS} | {"bicycle": ["bicycle", "bike"]}
PLURAL = {c: [c + "s"] for c in WHATS} | {
    "person": ["people"], "bus": ["buses"], "bench": ["benches"],
    "bicycle": ["bicycles", "bikes"]}
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
SETTING_WORDS = {  # nouns (and noun phrases) that name a setting
    "station": ["station", "train station", "railway station", "platform", "station platform"],
    "street": ["street", "city street", "road"],
    "park": ["park", "field", "grassy field", "grass"],
    "water": ["water", "lake", "harbor", "waterfront"],
}
WAITING = ["waiting for a train", "waiting for the train"]
FILLERS = {"of", "on", "in", "at", "the", "by", "near", "with", "and", "next", "to", "view",
           "picture", "photo", "scene", "there", "is", "are"}


def _lexicon() -> dict[tuple[str, ...], tuple[str, object]]:
    lex = {(w,): ("filler", None) for w in FILLERS}
    lex |= {(w,): ("colour", w) for w in COLOURS}
    lex |= {("a",): ("quant", (">=", 1)), ("an",): ("quant", (">=", 1)),
            ("a", "group", "of"): ("quant", (">=", 3)), ("a", "single"): ("quant", ("==", 1))}
    lex |= {(w,): ("quant", ("==", n)) for w, n in NUMBERS.items()}
    for what in WHATS:
        lex |= {(w,): ("noun", (what, False)) for w in SINGULAR[what]}
        lex |= {(w,): ("noun", (what, True)) for w in PLURAL[what]}
    for setting, phrases in SETTING_WORDS.items():
        lex |= {tuple(p.split()): ("setting", setting) for p in phrases}
    lex |= {tuple(p.split()): ("waiting", None) for p in WAITING}
    return lex


LEXICON = _lexicon()
_LONGEST = max(len(k) for k in LEXICON)


def _tokens(text: str) -> list[tuple[str, object]]:
    """Longest-match lexing, so "train station" is a setting, not a train. None if unknown."""
    words, out, i = re.findall(r"[a-z]+", text.lower()), [], 0
    while i < len(words):
        for size in range(min(_LONGEST, len(words) - i), 0, -1):
            entry = LEXICON.get(tuple(words[i:i + size]))
            if entry is not None:
                out.append(entry)
                i += size
                break
        else:
            return None
    return out


def parse_caption(text: str) -> Predicate | None:
    """The predicate of a sentence in the caption language; None if it is not one."""
    tokens = _tokens(text)
    if tokens is None:
        return None
    setting, constraints, quant, colour = None, [], None, None
    for kind, value in tokens:
        if colour is not None and kind != "noun":
            return None  # a colour word must be followed by its noun
        if kind == "quant":
            quant = value
            continue
        if kind == "colour":
            colour = value
            continue
        if kind == "noun":
            what, plural = value
            op, n = quant or ((">=", 2) if plural else (">=", 1))
            constraints.append(Constraint(what, colour, op, n))
        elif kind in ("setting", "waiting"):
            new = "station" if kind == "waiting" else value
            if setting not in (None, new):
                return None  # two different places
            setting = new
            if kind == "waiting":
                constraints.append(Constraint("train"))
        quant, colour = None, None  # a quantifier binds only the next noun
    if colour is not None or (setting is None and not constraints):
        return None
    return Predicate(setting, tuple(constraints))
