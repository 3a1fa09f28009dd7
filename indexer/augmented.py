"""Exact CSD and W2 search with a plain FAISS index over augmented vectors (DESIGN.md).

Both scores are squared distances that split into a part shared with μ and a part that
depends on one side only, so a vector trick makes them ordinary FAISS metrics:

  CSD  ‖μ_q−μ_d‖² + Σv_q + Σv_d  = ‖μ_q‖² + Σv_q − 2·⟨[μ_q, 1], [μ_d, −½(‖μ_d‖² + Σv_d)]⟩
       so the largest inner product of the augmented vectors is the smallest CSD;
  W2   ‖μ_q−μ_d‖² + ‖σ_q−σ_d‖²  = ‖[μ_q, σ_q] − [μ_d, σ_d]‖²   (σ = exp(½ log_var))
       so it is plain L2 between [μ, σ] vectors.

A Flat index over these vectors returns the exact top-k of the score over every item, which
makes it both a search option and a reference that needs no shortlist at all. Vectors are
built from the stored (float16) log_var, the same values the engine rescores.
"""
from __future__ import annotations

import logging

import faiss
import numpy as np

from core.errors import PcmeError
from indexer.store import stored_log_var

logger = logging.getLogger(__name__)

AUGMENTED_SCORES = ("csd", "w2")


def check_scores(scores) -> None:
    bad = [s for s in scores if s not in AUGMENTED_SCORES]
    if bad:
        raise PcmeError(f"augmented index for {bad}: only {', '.join(AUGMENTED_SCORES)} can be "
                        "searched exactly by augmented vectors")


def file_name(modality: str, score: str) -> str:
    return f"{modality}.{score}.faiss"


def aug_dim(score: str, dim: int) -> int:
    return dim + 1 if score == "csd" else 2 * dim


def make_index(score: str, dim: int) -> faiss.Index:
    """Flat (exact) index: inner product for CSD, L2 for W2."""
    check_scores([score])
    if score == "csd":
        return faiss.IndexFlatIP(aug_dim(score, dim))
    return faiss.IndexFlatL2(aug_dim(score, dim))


def item_vectors(score: str, mu: np.ndarray, log_var: np.ndarray) -> np.ndarray:
    """[N, D'] augmented item vectors (float32)."""
    _check(mu, log_var)
    lv = stored_log_var(log_var)
    if score == "csd":
        extra = -0.5 * (np.einsum("ij,ij->i", mu, mu) + np.exp(lv).sum(axis=1))
        out = np.concatenate([mu, extra[:, None]], axis=1)
    else:
        out = np.concatenate([mu, np.exp(0.5 * lv)], axis=1)
    return np.ascontiguousarray(out, dtype=np.float32)


def query_vectors(score: str, mu_q: np.ndarray, log_var_q: np.ndarray) -> np.ndarray:
    """[Q, D'] augmented query vectors (float32)."""
    _check(mu_q, log_var_q)
    if score == "csd":
        out = np.concatenate([mu_q, np.ones((len(mu_q), 1), mu_q.dtype)], axis=1)
    else:
        out = np.concatenate([mu_q, np.exp(0.5 * log_var_q)], axis=1)
    return np.ascontiguousarray(out, dtype=np.float32)


def search(index: faiss.Index, score: str, mu_q: np.ndarray, log_var_q: np.ndarray,
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k: (ids [Q, k], raw score [Q, k]) with the score in its own sign (lower is
    better for both CSD and W2), recovered from FAISS's inner product or L2 distance."""
    check_scores([score])
    found, ids = index.search(query_vectors(score, mu_q, log_var_q), k)
    if score == "csd":
        own = np.einsum("ij,ij->i", mu_q, mu_q) + np.exp(log_var_q).sum(axis=1)
        return ids, own[:, None] - 2.0 * found
    return ids, found


def _check(mu: np.ndarray, log_var: np.ndarray) -> None:
    if mu.ndim != 2 or mu.shape != log_var.shape:
        raise PcmeError(f"augmented vectors: mu {mu.shape} and log_var {log_var.shape} must be "
                        "equal [N, D] arrays")
