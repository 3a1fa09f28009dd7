"""Writes imagenet_wordnet.json: each ImageNet-1k class's WordNet synonyms and hypernyms, the
words class_words.py adds to a class's name ("Eskimo dog" → husky; dog, canine; carnivore).

The classifier often names the right thing in words a user would not type: a photo of a dog
comes out as "Eskimo dog" and "Siberian husky", a horse as "sorrel", a wheelie bin as "ashcan".
WordNet says what those are (husky → working dog → dog; sorrel → horse; ashcan = trash can), and
the ImageNet classes are WordNet noun synsets, so their synonyms, the names of the synsets
above them and their definitions (glosses: "sorrel: a horse of a brownish orange to light brown
color") are one lookup away. Run once, offline; the output is committed and read at model
build time, so neither training nor search needs WordNet:

    apt-get install -y wordnet-base                     # WordNet 3.0 database files
    python -m encoders.model.wordnet_classes            # rewrites encoders/model/imagenet_wordnet.json

Matching: torchvision ships the class names but not their synset ids. The classes are in
ascending synset-offset order (the order of their WordNet ids), so each name is matched to a
noun synset having it as a lemma, choosing among homonyms ("crane" the bird and the machine)
the assignment that keeps the offsets increasing for the most classes (a longest-chain dynamic
programme), and among assignments as long the synsets that spell the name as their first
lemma and list it as the lexicographer's first sense (`penalty`). Classes no synset names keep
their name alone.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

WORDNET = Path("/usr/share/wordnet")
OUT = Path(__file__).with_name("imagenet_wordnet.json")
LEVELS = 3            # hypernym levels written (class_words.py weighs level j by DECAY**j)
# words of a gloss that say nothing of what the thing looks like or is called
GLOSS_STOPWORDS = {"the", "and", "for", "with", "from", "that", "this", "its", "are", "has", "have",
                   "can", "any", "which", "used", "usually", "often", "especially", "having",
                   "one", "two", "several", "various", "type", "kind", "sort", "form", "made",
                   "large", "small", "genus", "family", "species"}
NOTICE = ("WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. Derived "
          "data (lemmas of synsets and their hypernyms, content words of their glosses), "
          "redistributed under the WordNet "
          "license: https://wordnet.princeton.edu/license-and-commercial-use")


def read_nouns(wordnet: Path) -> dict[int, tuple[list[tuple[str, int]], list[int], str]]:
    """{synset offset: ([(lemma, lex_id)], hypernym offsets, gloss)} from WordNet's data.noun."""
    path = wordnet / "data.noun"
    if not path.is_file():
        raise SystemExit(f"error: {path}: not found; install WordNet first: "
                         f"apt-get install -y wordnet-base")
    nouns = {}
    with open(path, encoding="latin-1") as f:
        for line in f:
            if line.startswith(" "):             # the license header
                continue
            fields = line.split(" | ")[0].split()
            n_words = int(fields[3], 16)
            lemmas = [(fields[4 + 2 * i], int(fields[5 + 2 * i], 16)) for i in range(n_words)]
            at = 4 + 2 * n_words
            hypernyms = []
            for j in range(int(fields[at])):
                symbol, offset, pos = fields[at + 1 + 4 * j: at + 4 + 4 * j]
                if symbol in ("@", "@i") and pos == "n":  # hypernym, instance hypernym
                    hypernyms.append(int(offset))
            gloss = line.split(" | ", 1)[1] if " | " in line else ""
            nouns[int(fields[0])] = (lemmas, hypernyms, gloss)
    return nouns


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def penalty(name: str, lemmas: list[tuple[str, int]]) -> int:
    """How unlike a class's synset this one is, for a synset having `name` as a lemma: the
    class names are their synset's first lemma as spelled there, and the first sense a
    lexicographer wrote of a word (lex_id 0) is the plain one (the hand tool "hammer", lex_id 0;
    the gun's hammer, 4)."""
    first, _ = lemmas[0]
    lex_id = next(i for lemma, i in lemmas if _key(lemma) == _key(name))
    spelled = first.replace("_", " ") == name
    return (0 if spelled else 100 if _key(first) == _key(name) else 200) + lex_id


def match_classes(names: list[str], nouns: dict) -> list[int | None]:
    """Synset offset per class name (None: no synset has it as a lemma, or no increasing
    assignment includes it): the longest chain of increasing offsets over the candidates, and
    among chains as long the one of least summed `penalty`."""
    by_lemma: dict[str, set[int]] = {}
    for offset, (lemmas, *_) in nouns.items():
        for lemma, _ in lemmas:
            by_lemma.setdefault(_key(lemma), set()).add(offset)
    # best[o] = (classes matched, −summed penalty, chain) of the best chain ending at offset o
    best: dict[int, tuple[int, int, tuple]] = {-1: (0, 0, ())}
    for k, name in enumerate(names):
        new = dict(best)
        for offset in sorted(by_lemma.get(_key(name), ())):
            below = [v for o, v in best.items() if o < offset]
            count, score, chain = max(below, key=lambda v: v[:2])
            candidate = (count + 1, score - penalty(name, nouns[offset][0]),
                         chain + ((k, offset),))
            if offset not in new or candidate[:2] > new[offset][:2]:
                new[offset] = candidate
        best = new
    chosen = dict(max(best.values(), key=lambda v: v[:2])[2])
    return [chosen.get(k) for k in range(len(names))]


def gloss_words(gloss: str) -> list[str]:
    """The content words of a synset's gloss, in order, its quoted examples left out:
    "breed of heavy-coated Arctic sled dog" -> [breed, heavy, coated, arctic, sled, dog]."""
    definition = re.sub(r'"[^"]*"', " ", gloss)
    return [w for w in re.split(r"[^a-z]+", definition.lower())
            if len(w) > 2 and w not in GLOSS_STOPWORDS]


def related(offset: int, nouns: dict, levels: int = LEVELS) -> dict:
    """{"synonyms": the synset's lemmas, "hypernyms": [lemmas of level 1, 2, ...], "gloss": the
    content words of its definition} with spaces for underscores; a level holds every synset
    one step above the previous one."""
    def lemmas(offsets):
        return sorted({lemma.replace("_", " ") for o in offsets for lemma, _ in nouns[o][0]})
    out = {"synonyms": lemmas([offset]), "hypernyms": [], "gloss": gloss_words(nouns[offset][2])}
    level = [offset]
    for _ in range(levels):
        level = sorted({h for o in level for h in nouns[o][1]})
        if not level:
            break
        out["hypernyms"].append(lemmas(level))
    return out


def build(names: list[str], wordnet: Path) -> dict:
    nouns = read_nouns(wordnet)
    matched = match_classes(names, nouns)
    classes = [dict(name=name, **(related(o, nouns) if o is not None else
                                  {"synonyms": [], "hypernyms": [], "gloss": []}))
               for name, o in zip(names, matched)]
    return {"source": "WordNet 3.0 noun synsets of the ImageNet-1k classes (wordnet-base)",
            "notice": NOTICE, "levels": LEVELS,
            "matched": sum(o is not None for o in matched), "classes": classes}


def main(argv=None) -> int:
    from encoders.model.class_words import imagenet_class_names

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wordnet", type=Path, default=WORDNET, help="folder with data.noun")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    table = build(imagenet_class_names(), args.wordnet)
    tmp = args.out.with_suffix(".tmp")
    head = {k: v for k, v in table.items() if k != "classes"}
    lines = [json.dumps(c, ensure_ascii=False) for c in table["classes"]]   # one class a line
    tmp.write_text(json.dumps(head, ensure_ascii=False)[:-1] + ', "classes": [\n'
                   + ",\n".join(lines) + "\n]}\n", encoding="utf-8")
    tmp.replace(args.out)
    print(f"{args.out}: {table['matched']} of {len(table['classes'])} classes matched to WordNet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
