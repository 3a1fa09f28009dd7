"""Class words: what a pretrained ImageNet classifier sees, said in the text tower's word space.

NOT in the PCME papers; `class_words` under [model] (EfficientNet-Lite0 only). A few hundred
captioned photos cannot teach a text-to-image map that reaches words training never saw, but the
backbone's own 1000-class ImageNet classifier already names much of what is in a photo ("koala",
"fire engine", "bassoon"), and GloVe places those names next to the words a user types. So:

  image:  c(x) = Σ_k softmax(classifier(pooled features))_k · g_k      g_k = class k's name vector
  text:   c(t) = attention-weighted mean of the caption's word vectors
  both:   μ gets W · c added before its LayerNorm, with ONE W shared by the two towers

g_k is the mean GloVe vector of the words of class k's name (torchvision's ImageNet category
names, shipped with torchvision itself; names GloVe does not know at all get zeros). A word
training never saw reaches W through its GloVe vector on the text side and, when a photo's
classifier output puts mass on a class named like it, through the same W on the image side.
The table is fixed when a model is built and travels in the checkpoint as a buffer.
"""
from __future__ import annotations

import re

import numpy as np

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


def class_word_table(names: list[str], vectors: dict[str, np.ndarray], dim: int) -> np.ndarray:
    """[len(names), dim] float32: row k = mean vector of name k's words that `vectors` knows
    (zeros when it knows none)."""
    out = np.zeros((len(names), dim), dtype=np.float32)
    for k, name in enumerate(names):
        known = [vectors[w] for w in name_words(name) if w in vectors]
        if known:
            out[k] = np.mean(known, axis=0)
    return out


def class_name_words() -> set[str]:
    """Every word of the ImageNet class names (what the class-word table reads from GloVe)."""
    return {w for n in imagenet_class_names() for w in name_words(n)}


def imagenet_class_words(glove: str = "", dim: int | None = None,
                         vectors: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """The class-word table for the ImageNet classifier, from the same GloVe as the vocabulary
    (`glove`: a text file, or empty for the offline package; `vectors`: already read, e.g. in
    the same pass over a large GloVe file as the vocabulary's)."""
    from encoders.model.text import glove_vectors

    if vectors is None:
        vectors = glove_vectors(class_name_words(), glove)
    width = dim if dim is not None else len(next(iter(vectors.values())))
    return class_word_table(imagenet_class_names(), vectors, width)
