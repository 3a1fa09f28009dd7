"""Exhaustive probabilistic search: every item scored, the reference that recall is measured
against (`query --exact`, `bench`).

Up to CACHE_MAX_BYTES, all μ and log_var of a modality are read once and kept in memory as
float32 tensors (1M × 256 is 2 GB for both); larger modalities (10M × 256 would be 20 GB) are
streamed from the store a block at a time on every call, so memory stays bounded whatever N. Items are scored a block at a time with `scores.pairwise` (matmul fast paths
for mu/csd/w2), keeping a running top-k, so the temporaries stay a few tens of MB whatever N.
`mc` uses the same per-item noise and kernel as the shortlist rescorer
(core.served_mc.fixed_match_prob), so both give the same numbers.
Cost at 1M × 256 on 2 cores: ~1 s per query for elk/bhattacharyya, ~2 s for mc, and a
fixed ~20 s to read all vectors once.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from core.errors import PcmeError
from core.served_mc import MC_SAMPLES, fixed_match_prob
from core.pairwise import pairwise
from core.scores import rank_key, score_name

logger = logging.getLogger(__name__)

BLOCK = 16_384       # items per block: a (1, BLOCK, D) float32 temporary is 16 MB at D = 256
MC_BLOCK = 4_096     # mc holds (J, BLOCK, D) samples and a (J·Q, J·BLOCK) matrix
CACHE_MAX_BYTES = 4 << 30  # above this, exact search streams the store instead of caching it


class ExactSearcher:
    """Exhaustive top-k over one modality's items; vectors are loaded on first use."""

    def __init__(self, reader, modality: str):
        self.reader, self.modality = reader, modality
        self._mu = self._lv = None

    def vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._mu is None:
            _, mu, lv = self.reader.all_vectors(self.modality)
            self._mu, self._lv = torch.from_numpy(mu), torch.from_numpy(lv)
            logger.info("exact search: %d %s vectors cached", len(mu), self.modality)
        return self._mu, self._lv

    def topk(self, score: str, mu_q: np.ndarray, lv_q: np.ndarray, k: int,
             a: float = 5.0, b: float = 5.0, mc_samples: int = MC_SAMPLES
             ) -> tuple[np.ndarray, np.ndarray]:
        """(ids [Q, k'], rank keys [Q, k'], best first) of the exact top-k, k' = min(k, N)."""
        score = score_name(score)
        if mu_q.ndim != 2 or mu_q.shape != lv_q.shape:
            raise PcmeError(f"exact search: queries must be [Q, D] arrays, got {mu_q.shape} "
                            f"and {lv_q.shape}")
        q_mu, q_lv = torch.from_numpy(np.ascontiguousarray(mu_q, np.float32)), \
            torch.from_numpy(np.ascontiguousarray(lv_q, np.float32))
        k = min(k, self.reader.count(self.modality))
        best_keys = torch.full((len(mu_q), 0), -torch.inf)
        best_ids = torch.zeros((len(mu_q), 0), dtype=torch.int64)
        block = MC_BLOCK if score == "mc" else BLOCK
        for d_ids, d_mu, d_lv in self._blocks(block):
            keys = self._block_keys(score, q_mu, q_lv, d_mu, d_lv, d_ids, a, b, mc_samples)
            keys = torch.cat([best_keys, keys], dim=1)
            ids = torch.cat([best_ids, torch.from_numpy(d_ids).expand(len(mu_q), -1)], dim=1)
            best_keys, pos = keys.topk(min(k, keys.shape[1]), dim=1)
            best_ids = ids.gather(1, pos)
        return best_ids.numpy(), best_keys.numpy()

    def _blocks(self, block: int):
        """(ids, μ tensor, log_var tensor) of item blocks, each item once, from memory or
        streamed from the store (reader.vector_blocks: its storage order)."""
        n, dim = self.reader.count(self.modality), self.reader.dim
        if n * dim * 8 > CACHE_MAX_BYTES:
            for ids, mu, lv in self.reader.vector_blocks(self.modality, block):
                yield ids, torch.from_numpy(mu), torch.from_numpy(lv)
            return
        mu, lv = self.vectors()
        for s in range(0, n, block):
            yield np.arange(s, min(s + block, n)), mu[s:s + block], lv[s:s + block]

    def _block_keys(self, score, q_mu, q_lv, d_mu, d_lv, ids, a, b, mc_samples) -> torch.Tensor:
        if score != "mc":
            return rank_key(score, pairwise(score, q_mu, q_lv, d_mu, d_lv))
        return torch.from_numpy(fixed_match_prob(q_mu.numpy(), q_lv.numpy(), d_mu.numpy(),
                                                 d_lv.numpy(), ids, a, b, mc_samples))
