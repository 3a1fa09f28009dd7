"""Class words: what a pretrained ImageNet classifier sees, said in the text tower's word space.

NOT in the PCME papers; `class_words` under [model] (EfficientNet-Lite0 only). A few hundred
captioned photos cannot teach a text-to-image map that reaches words training never saw, but the
backbone's own 1000-class ImageNet classifier already names much of what is in a photo ("koala",
"fire engine", "bassoon"), and GloVe places those names next to the words a user types. So:

  image:  c(x) = Σ_k softmax(classifier(pooled features))_k · g_k      g_k = class k's name vector
  text:   c(t) = attention-weighted mean of the caption's word vectors
  both:   μ gets W · c added before its LayerNorm, with ONE W shared by the two towers

g_k says class k in word vectors (`class_word_source` under [model]):
  names    the mean GloVe vector of the words of its name (torchvision's ImageNet category
           names, shipped with torchvision itself; names GloVe does not know get zeros);
  wordnet  (default) a weighted mean of four means: the name's words (weight 1), its WordNet
           synonyms' (1) and the names of the synsets one, two and three levels above it
           (DECAY, DECAY², DECAY³), from imagenet_wordnet.json (encoders/model/wordnet_classes.py).
           The classifier names a dog photo "Eskimo dog" or "Siberian husky" and a horse
           "sorrel"; with the levels above, "dog" and "horse" are in their vectors;
  wordnet-gloss  the same plus the content words of the class's WordNet definition (its
           gloss: "sorrel: a horse of a brownish orange to light brown color") as a fifth
           group of weight GLOSS_WEIGHT.
A word training never saw reaches W through its GloVe vector on the text side and, when a
photo's classifier output puts mass on a class named like it, through the same W on the image
side. The table is fixed when a model is built and travels in the checkpoint as a buffer.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from core.errors import PcmeError

N_CLASSES = 1000  # ImageNet-1k: the size of EfficientNet-Lite0's classifier


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k category names in classifier order (no download: the list is part
    of torchvision's weight metadata, which is code)."""
    from torchvision.models import ResNet18_Weights

    names = list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
    assert len(names) == N_CLASSES, len(names)
    return names


def name_words(name: str) -> list[str]:
    """'great white shark' -> [great, white, shark]; "jack-o'-lantern" -> [jack, o, lantern]."""
    return [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]


SOURCES = ("names", "wordnet", "wordnet-gloss")   # class_word_source choices (ModelConfig)
DECAY = 0.7   # weight of hypernym level j is DECAY**j: chosen zero-shot on the TRAIN photos'
              # subjects (README "Real photographs")
GLOSS_WEIGHT = 2.0   # weight of the gloss's words (wordnet-gloss), chosen the same way:
                     # 0 / 0.5 / 1 / 2 / 3 / 4 / 6 found 91 / 92 / 91 / 93 / 93 / 88 / 80 of 244
WORDNET_TABLE = Path(__file__).with_name("imagenet_wordnet.json")


def class_word_groups(source: str) -> list[list[tuple[float, list[str]]]]:
    """Per class, the (weight, words) groups its vector averages (see the module doc)."""
    if source not in SOURCES:
        raise PcmeError(f"class_word_source {source!r} is unknown; choose one of "
                        f"{', '.join(SOURCES)}")
    names = imagenet_class_names()
    groups = [[(1.0, name_words(name))] for name in names]
    if source in ("wordnet", "wordnet-gloss"):
        table = json.loads(WORDNET_TABLE.read_text(encoding="utf-8"))["classes"]
        for k, (row, entry, name) in enumerate(zip(groups, table, names)):
            if entry["name"] != name:
                raise PcmeError(f"{WORDNET_TABLE}: class {k} is {entry['name']!r} there but "
                                f"{name!r} in torchvision; rewrite it with: python -m "
                                f"encoders.model.wordnet_classes")
            row.append((1.0, [w for lemma in entry["synonyms"] for w in name_words(lemma)]))
            row += [(DECAY ** (j + 1), [w for lemma in level for w in name_words(lemma)])
                    for j, level in enumerate(entry["hypernyms"])]
            if source == "wordnet-gloss":
                row.append((GLOSS_WEIGHT, entry["gloss"]))
    return groups


def class_word_table(groups: list[list[tuple[float, list[str]]]],
                     vectors: dict[str, np.ndarray], dim: int) -> np.ndarray:
    """[classes, dim] float32: row k = Σ_g weight_g · mean(vectors of group g's words) / Σ_g
    weight_g over the groups of class k with a known word (zeros when none has one)."""
    out = np.zeros((len(groups), dim), dtype=np.float32)
    for k, row in enumerate(groups):
        means = [(weight, np.mean([vectors[w] for w in words if w in vectors], axis=0))
                 for weight, words in row if any(w in vectors for w in words)]
        if means:
            out[k] = sum(weight * m for weight, m in means) / sum(weight for weight, _ in means)
    return out


def class_name_words(source: str) -> set[str]:
    """Every word the class-word table of `source` reads from GloVe."""
    return {w for row in class_word_groups(source) for _, words in row for w in words}


def imagenet_class_words(source: str, glove: str = "", dim: int | None = None,
                         vectors: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """The class-word table of `source` for the ImageNet classifier, from the same GloVe as
    the vocabulary (`glove`: a text file, or empty for the offline package; `vectors`: already
    read, e.g. in the same pass over a large GloVe file as the vocabulary's)."""
    from encoders.model.text import glove_vectors

    if vectors is None:
        vectors = glove_vectors(class_name_words(source), glove)
    width = dim if dim is not None else len(next(iter(vectors.values())))
    return class_word_table(class_word_groups(source), vectors, width)
