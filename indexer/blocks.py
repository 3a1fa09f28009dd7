"""One list block's value (store formats 3 to 6): how indexer/lists.py lays out the rows of
one IVF inverted list in a single LMDB value, and reads them back as zero-copy views.

  value: n int64 ids (ascending), then μ float32 [n, D], then log_var float16 [n, D]
         (columns, so each is one zero-copy numpy view);
         format 4 appends the row bounds' scalars (engine/row_bounds.py): rho, lv_sum
         float32 [n], then lv_ref float32 [D], rho0 float32;
         format 6 also each row's μ code (mu_codes): scale, err float32 [n] after lv_sum, and
         the codes int16 [n, D] before lv_ref

Format 6 adds a 16-bit copy of μ for the row bounds: a guaranteed query reads every probed
row's μ once to bound it and only ~50 rows exactly, so the bound pass's 1 KB of float32 a
row was most of a query's memory traffic (the same 2 MB a μ-only FAISS scan reads). The codes
halve it; the bound stays exact by taking off each row's stored quantisation error (see
engine/row_bounds.py). Exact scores and hits still read the float32 μ. The store grows by
2·D + 8 bytes a row (+0.5 GB at 1M × 256), so a modality gets codes only while its store stays
within CODES_MAX_STORE (codes_for): at 10M × 256 they took the store from 15.3 to 20.3 GB on a
24 GB machine and the list blocks fell out of the page cache (elk p50 2.32 → 4.13 ms). Blocks
without codes (formats 4 and 5, and larger modalities) are bounded from float32 μ itself: the
same bound with scale 1 and error 0, the arithmetic of format 5.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from indexer.store import row_bytes


def row_scalars(log_var: np.ndarray) -> tuple[np.ndarray, ...]:
    """(rho [n], lv_sum [n], lv_ref [D], rho0 [1]) of a block's stored float16 log_var, for
    engine/row_bounds.py: lv_ref is the per-dimension mean log v (b_d = exp(lv_ref_d));
    rho_i = exp(max_d(lv_i,d − lv_ref_d)) rounded UP, so v_i,d ≤ rho_i·b_d holds;
    lv_sum_i = Σ_d lv_i,d; rho0 the block's median rho."""
    lv = log_var.astype(np.float64)
    ref = lv.mean(axis=0).astype(np.float32)
    rho = _rounded(np.exp((lv - ref.astype(np.float64)).max(axis=1)) * (1 + 1e-12), np.inf)
    return rho, lv.sum(axis=1).astype(np.float32), ref, np.median(rho).astype(np.float32)[None]


def _rounded(x: np.ndarray, towards: float) -> np.ndarray:
    """float64 -> float32, rounded towards +inf or -inf instead of to nearest."""
    y = x.astype(np.float32)
    off = y.astype(np.float64) < x if towards > 0 else y.astype(np.float64) > x
    return np.where(off, np.nextafter(y, np.float32(towards)), y).astype(np.float32)


CODE_MAX = 32767   # μ codes: int16, symmetric
CODES_MAX_STORE = 8 << 30   # bytes of list blocks up to which a modality gets μ codes


def codes_for(n: int, dim: int) -> bool:
    """Whether a modality of n rows of dim D gets μ codes in its blocks: while its blocks with
    codes (ids, μ, log_var, 4 scalars and the codes: 8D + 24 bytes a row) stay within
    CODES_MAX_STORE, ~4M rows at 256-d, so they stay in the page cache of a 16-24 GB machine
    beside the FAISS index. A function of the counts alone, so every machine of a build
    decides the same."""
    return n * (8 * dim + 24) <= CODES_MAX_STORE


def mu_codes(mu: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes int16 [n, D], scale float32 [n], err float32 [n]) of float32 μ rows: each row
    scaled by its own largest |μ| to ±CODE_MAX, so μ̂_i = scale_i·codes_i, and
    err_i ≥ ‖μ_i − μ̂_i‖ (computed in float64, rounded up). An all-zero row: scale 1, error 0."""
    mu = np.asarray(mu, np.float32)
    top = np.abs(mu).max(axis=1) if mu.size else np.zeros(len(mu), np.float32)
    scale = np.where(top > 0, top.astype(np.float64) / CODE_MAX, 1.0).astype(np.float32)
    q = mu / scale[:, None]
    codes = np.clip(np.rint(q, out=q), -CODE_MAX, CODE_MAX, out=q).astype(np.int16)
    rest = mu.astype(np.float64)
    rest -= codes * scale.astype(np.float64)[:, None]   # exact products: 15 + 24 bits
    err = np.sqrt(np.einsum("nd,nd->n", rest, rest)) * (1 + 1e-6)
    return codes, scale, _rounded(err, np.inf)


def encode_block(ids: np.ndarray, mu: np.ndarray, log_var: np.ndarray,
                 row_stats: bool = True, codes: bool = True) -> bytes:
    """A block's value: format 6; `codes=False` the format-4/5 layout, `row_stats=False` the
    format-3 one (neither scalars nor codes)."""
    parts = [np.ascontiguousarray(ids, "<i8"), np.ascontiguousarray(mu, np.float32),
             np.ascontiguousarray(log_var, np.float16)]
    if row_stats:
        rho, lv_sum, ref, rho0 = row_scalars(parts[2])
        parts += [rho, lv_sum]
        if codes:
            code, scale, err = mu_codes(parts[1])
            parts += [scale, err, code]
        parts += [ref, rho0]
    return b"".join(p.tobytes() for p in parts)


@dataclass
class Block:
    """One inverted list: ids [n], μ float32 [n, D], log_var float16 [n, D] (views), and from
    format 4 the row bounds' scalars (row_scalars), what the bound reads for μ (its 16-bit
    codes where format 6 stored them, else μ itself) and, derived when read, each row's
    geometric-mean variance, squared norm and variance sum (None in format 3)."""
    ids: np.ndarray
    mu: np.ndarray
    log_var: np.ndarray
    rho: np.ndarray | None = None
    lv_sum: np.ndarray | None = None
    lv_ref: np.ndarray | None = None
    rho0: float | None = None
    geo: np.ndarray | None = None    # exp(lv_sum / D) float64: each row's geometric-mean variance
    sq_norm: np.ndarray | None = None   # ‖μ_i‖² float64
    var_sum: np.ndarray | None = None   # Σ_d v_i,d float64
    codes: np.ndarray | None = None     # μ ≈ scale·codes, int16 [n, D] (mu_codes), or μ
    code_scale: np.ndarray | None = None
    code_err: np.ndarray | None = None
    # what the compiled bound reads, packed (each array handed to numba costs ~1 µs a call):
    terms: np.ndarray | None = None     # float32 [4, n]: rho, lv_sum, code_scale, code_err
    ref: np.ndarray | None = None       # float32 [D + 1]: lv_ref, rho0
    lv_bits: np.ndarray | None = None   # log_var's float16 bits (uint16 view)


def row_scalar_count(codes: bool) -> int:
    """float32 scalars per row: rho, lv_sum (format 4), and the codes' scale, err (format 6)."""
    return 4 if codes else 2


def decode_block(value, dim: int, row_stats: bool = False, codes: bool = False,
                 derive: bool = True) -> Block:
    """A block's views; `row_stats`: format 4 or later, `codes`: format 6 (stored codes);
    `derive=False`: ids, μ and log_var only (a pass that reads every row once)."""
    raw = np.frombuffer(value, np.uint8)
    scalars_n = row_scalar_count(codes) if row_stats else 0
    per_row = 8 + row_bytes(dim) + 4 * scalars_n + (2 * dim if codes else 0)
    fixed = 4 * (dim + 1) if row_stats else 0
    n = (len(raw) - fixed) // per_row
    if n < 0 or n * per_row + fixed != len(raw):
        raise ValueError(f"list block of {len(raw)} bytes is not whole rows of dim {dim}")
    ids = raw[:8 * n].view("<i8")
    at = 8 * n + 4 * n * dim
    mu = raw[8 * n:at].view(np.float32).reshape(n, dim)
    log_var = raw[at:at + 2 * n * dim].view(np.float16).reshape(n, dim)
    if not (row_stats and derive):
        return Block(ids, mu, log_var)
    at += 2 * n * dim
    scalars = raw[at:at + 4 * scalars_n * n].view(np.float32).reshape(scalars_n, n)
    at += 4 * scalars_n * n
    if codes:
        code = raw[at:at + 2 * n * dim].view(np.int16).reshape(n, dim)
        at += 2 * n * dim
        terms = scalars
    else:   # no codes: the bound reads float32 μ, as scale 1 and error 0
        code = mu
        terms = np.stack([scalars[0], scalars[1], np.ones(n, np.float32),
                          np.zeros(n, np.float32)])
    tail = raw[at:].view(np.float32)
    # per-row terms the engine reads on every query, computed once per decoded block
    geo = np.exp(scalars[1].astype(np.float64) / dim)
    sq_norm = np.einsum("nd,nd->n", mu, mu, dtype=np.float64)
    var_sum = np.exp(log_var.astype(np.float32)).sum(axis=1, dtype=np.float64)
    return Block(ids, mu, log_var, terms[0], terms[1], tail[:dim], float(tail[dim]), geo,
                 sq_norm, var_sum, code, terms[2], terms[3], terms, tail[:dim + 1],
                 log_var.view(np.uint16))
