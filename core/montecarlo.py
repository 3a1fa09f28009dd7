"""The Monte-Carlo match probability of PCME, written once for the loss, eval and the engine.

Each side is sampled with the reparameterisation z = μ + exp(½·log_var)·ε, and a pair of samples
matches with probability sigmoid(−a‖z_q − z_d‖ + b). `sample_logits` is the loss's kernel:
it takes log-sigmoids of it (encoders/training/losses.py); `match_prob_block` averages its
sigmoid over all J×J sample pairs of a [Q, M] block, and the contract function `match_prob`
does the same for arbitrary broadcast shapes.

Serving and eval share fixed noise (`item_noise`): an item's samples depend only on its id, so
its score does not depend on which other items share a call, and eval's mc equals query's mc.
`fixed_match_prob` computes that served score (eval, exact search, rescoring, every hit's
p_match), the same sums as match_prob_block with the fixed noise, laid out for speed.
"""
from __future__ import annotations

import threading
from functools import lru_cache

import numpy as np
import torch

from core.constants import MC_SAMPLES, MC_SEED, NOISE_ROWS  # noqa: F401  (re-exported)
from core.errors import PcmeError

FIXED_BLOCK_FLOATS = 1 << 19   # sample-pair distances per block of fixed_match_prob: 2 MiB
LOOP_MAX_QUERY_SAMPLES = 32   # fixed_match_prob takes the compiled loop up to this Q·J
LOOP_MIN_ITEMS = 64            # and from this many items (see fixed_match_prob)
DIST_EPS = 1e-12       # inside the sqrt: keeps the gradient of ‖·‖ finite when samples coincide


def sample(mu: torch.Tensor, log_var: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = μ + exp(½·log_var)·ε, broadcasting (ε carries the sample axis)."""
    return torch.addcmul(mu, torch.exp(0.5 * log_var), eps)   # one pass (mu + s * eps: 7x slower
                                                              # when eps broadcasts a middle axis)


def _logit(sq: torch.Tensor, a, b, inplace: bool = False) -> torch.Tensor:
    """−a·√(max(sq, 0) + DIST_EPS) + b; `inplace` overwrites sq (no autograd: serving)."""
    if inplace:
        return sq.clamp_min_(0.0).add_(DIST_EPS).sqrt_().mul_(-a).add_(b)
    return -a * torch.sqrt(sq.clamp_min(0.0) + DIST_EPS) + b


def sample_logits(z_q: torch.Tensor, z_d: torch.Tensor, a, b) -> torch.Tensor:
    """[Q, J, M, J] logits −a‖z_q^j − z_d^j'‖ + b of every sample pair, from samples
    z_q [Q, J, D] and z_d [M, J, D]: one matmul via ‖x‖² + ‖y‖² − 2⟨x, y⟩."""
    if z_q.dim() != 3 or z_d.dim() != 3 or z_q.shape[1:] != z_d.shape[1:]:
        raise PcmeError(f"sample_logits: samples must be [B, J, D] with the same J and D, got "
                        f"{tuple(z_q.shape)} and {tuple(z_d.shape)}")
    (q, j, dim), m = z_q.shape, z_d.shape[0]
    x, y = z_q.reshape(-1, dim), z_d.reshape(-1, dim)
    sq = (x ** 2).sum(-1)[:, None] + (y ** 2).sum(-1)[None, :] - 2.0 * x @ y.T
    return _logit(sq, a, b).reshape(q, j, m, j)


def match_prob_block(mu_q, lv_q, mu_d, lv_d, eps_q, eps_d, a, b) -> torch.Tensor:
    """[Q, M] match probability of every query-item pair, all J×J sample pairs in one matmul.
    mu/lv: [Q, D] and [M, D]; eps_q [J, Q or 1, D], eps_d [J, M, D]."""
    z_q = sample(mu_q, lv_q, eps_q).movedim(0, 1)   # [Q, J, D]
    z_d = sample(mu_d, lv_d, eps_d).movedim(0, 1)   # [M, J, D]
    return sample_logits(z_q, z_d, a, b).sigmoid().mean(dim=(1, 3))


def _noise(eps, mu, n_samples, generator, side) -> torch.Tensor:
    shape = (n_samples, *mu.shape)
    if eps is None:
        return torch.randn(shape, generator=generator, dtype=mu.dtype, device=mu.device)
    if tuple(eps.shape) != shape:
        raise PcmeError(f"match_prob: eps_{side} must have shape (n_samples, *mu_{side}.shape) "
                        f"= {shape}, got {tuple(eps.shape)}")
    return eps


def match_prob(mu_q, log_var_q, mu_d, log_var_d, a, b, n_samples: int, generator=None,
               eps_q: torch.Tensor | None = None, eps_d: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Monte-Carlo match probability (1/J²) Σ_{j,j'} sigmoid(−a‖z_q^j − z_d^j'‖ + b) (higher).

    Broadcasts over leading dimensions like every contract score. J = n_samples samples of each
    side; the noise is drawn from `generator` (query side first) unless given: eps_q has shape
    (J, *mu_q.shape), eps_d (J, *mu_d.shape). Squared distances come from an einsum, one sample
    pair (j, j') at a time, so the working set stays a few tensors of the output's shape.
    """
    from core.scores import check_gauss  # the shape checks live with the closed forms

    out_shape = check_gauss(mu_q, log_var_q, mu_d, log_var_d)
    if n_samples < 1:
        raise PcmeError(f"match_prob: n_samples must be >= 1, got {n_samples}")
    z_q = sample(mu_q, log_var_q, _noise(eps_q, mu_q, n_samples, generator, "q"))
    z_d = sample(mu_d, log_var_d, _noise(eps_d, mu_d, n_samples, generator, "d"))
    sq_q, sq_d = (z_q ** 2).sum(-1), (z_d ** 2).sum(-1)
    total = torch.zeros(out_shape, dtype=z_q.dtype, device=z_q.device)
    for j in range(n_samples):
        for k in range(n_samples):
            cross = torch.einsum("...d,...d->...", z_q[j], z_d[k])
            total = total + _logit(sq_q[j] - 2.0 * cross + sq_d[k], a, b).sigmoid()
    return total / n_samples**2


@lru_cache(maxsize=4)
def _noise_table(n_samples: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """([NOISE_ROWS + 1, J, D] fixed standard-normal noise, which rows are drawn yet); row
    NOISE_ROWS is the query's. Rows are drawn on first use, each from its own stream: a
    one-shot query needs the rows of its ten hits, and drawing the whole table (16.8M
    normals at D = 256) cost more than the search."""
    return (np.empty((NOISE_ROWS + 1, n_samples, dim), np.float32),
            np.zeros(NOISE_ROWS + 1, bool))


def _noise_rows(rows: np.ndarray, n_samples: int, dim: int) -> torch.Tensor:
    """Rows `rows` (any shape S) of the fixed noise table: [*S, J, D]. Row r is the standard
    normal stream of torch's generator seeded MC_SEED·2³² + r, whichever rows were drawn
    before it (torch's, not numpy's: numpy.random is not imported otherwise on a query)."""
    table = _draw(rows, n_samples, dim)
    return torch.from_numpy(table)[torch.from_numpy(rows)]


def _draw(rows: np.ndarray, n_samples: int, dim: int) -> np.ndarray:
    """Draw the rows of the table not drawn yet; returns the table."""
    table, drawn = _noise_table(n_samples, dim)
    gen = torch.Generator()
    for r in np.unique(rows[~drawn[rows]]):
        gen.manual_seed(MC_SEED * 2**32 + int(r))
        table[r] = torch.randn(n_samples, dim, generator=gen).numpy()
        drawn[r] = True   # after the row is written: a concurrent reader never sees it early
    return table


def draw_all_noise(n_samples: int, dim: int) -> None:
    """Draw every row of the fixed noise now (~0.1 s at J = 16, D = 256 on an idle core):
    what a long-running server does at start-up, so no query pays ~20 µs per hit whose row
    is new."""
    _draw(np.arange(NOISE_ROWS + 1), n_samples, dim)


def item_noise(ids: np.ndarray, n_samples: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed noise keyed by item id. For ids of shape S returns (eps_q [J, 1…, D] broadcastable
    to S, eps_d [J, *S, D]); every query uses the same row."""
    ids = np.asarray(ids, dtype=np.int64)
    eps_d = _noise_rows(ids % NOISE_ROWS, n_samples, dim).movedim(-2, 0)  # (*S, J, D) -> (J, *S, D)
    eps_q = _noise_rows(np.asarray([NOISE_ROWS]), n_samples, dim)[0]
    return eps_q.reshape(n_samples, *([1] * ids.ndim), dim), eps_d


def fixed_match_prob(mu_q, lv_q, mu_d, lv_d, item_ids, a, b, n_samples: int = MC_SAMPLES
                     ) -> torch.Tensor:
    """[Q, M] match probability under the fixed serving noise: queries [Q, D] against items
    [M, D] whose ids are `item_ids` [M]. What eval reports and the engine serves as mc.

    The same sums as match_prob_block with item_noise (tests/test_noise_rows.py), in blocks
    of FIXED_BLOCK_FLOATS sample-pair distances, two ways. One query against many items (Q·J
    up to LOOP_MAX_QUERY_SAMPLES, at least LOOP_MIN_ITEMS items: an mc shortlist) takes the
    compiled loop of core/mc_kernel.py, which makes each item's samples in cache (200 items:
    0.9 against 2.0 ms). Otherwise the items' samples are made as one tensor and one matrix
    product per block takes them: BLAS runs it on every core, which wins for many query
    samples (eval's blocks of queries, exact search of a batch), and a few items (the p_match
    of a query's hits: 0.44 against 0.26 ms for 10) do not pay numba's start-up (0.2–0.45 s)
    in a process that has not run a compiled loop yet, such as a one-shot query on a small
    index. The logistic and the mean over the J×J pairs are vectorised torch ops either way."""
    item_ids = np.asarray(item_ids, dtype=np.int64)
    (n_q, dim), n_d, dtype = mu_q.shape, len(item_ids), mu_d.dtype
    rows = item_ids % NOISE_ROWS
    table = _draw(np.append(rows, NOISE_ROWS), n_samples, dim)
    eps_q = torch.from_numpy(table[NOISE_ROWS]).to(dtype)
    z_q = sample(mu_q[:, None], lv_q[:, None], eps_q).reshape(-1, dim)   # [Q·J, D]
    sq_q = (z_q * z_q).sum(-1)
    scale_d = torch.exp(0.5 * lv_d)
    loop = len(z_q) <= LOOP_MAX_QUERY_SAMPLES and n_d >= LOOP_MIN_ITEMS
    dists = _LoopDists(z_q, mu_d, scale_d, rows, table) if loop else \
        _ProductDists(z_q, mu_d, scale_d, torch.from_numpy(rows), torch.from_numpy(table))
    width = len(z_q) if loop else max(len(z_q), dim)   # the product path also holds samples
    step = max(1, min(n_d, FIXED_BLOCK_FLOATS // (n_samples * width)))   # items per block
    out = torch.empty(n_q, n_d, dtype=dtype)
    for s in range(0, n_d, step):
        m = min(step, n_d - s)
        sq = dists.block(s, m, step).add_(sq_q)   # [m, J, Q·J] (loop) or [m·J, Q·J] (product)
        p = _logit(sq, a, b, inplace=True).sigmoid_().view(m, n_samples, n_q, n_samples)
        out[:, s:s + m] = p.mean(dim=(1, 3)).T
    return out


class _LoopDists:
    """Distance blocks from the compiled loop: ‖z_d‖² − 2⟨z_q, z_d⟩ as [m, J, Q·J]."""

    def __init__(self, z_q, mu_d, scale_d, rows, table):
        self.z_q, self.mu_d, self.scale_d = z_q.numpy(), mu_d.contiguous().numpy(), scale_d.numpy()
        self.rows, self.table, self.dtype, self.buf = rows, table, mu_d.dtype, None

    def block(self, s: int, m: int, step: int) -> torch.Tensor:
        from core.mc_kernel import sample_sq_dists   # here: numba loads only if the loop runs

        if self.buf is None:
            self.buf = torch.empty(step, self.table.shape[1], len(self.z_q), dtype=self.dtype)
        sample_sq_dists(self.z_q, self.mu_d[s:s + m], self.scale_d[s:s + m], self.rows[s:s + m],
                        self.table, self.buf[:m].numpy())
        return self.buf[:m]


class _ProductDists:
    """Distance blocks from one matrix product: ‖z_d‖² − 2⟨z_d, z_q⟩ as [m·J, Q·J]. The items'
    noise rows are gathered item-major (index_select: no strided copy) and sampled into
    per-thread buffers kept between calls, so the temporaries stay in cache instead of
    faulting in fresh pages on every step."""

    def __init__(self, z_q, mu_d, scale_d, rows, table):
        self.z_q, self.mu_d, self.scale_d, self.rows, self.table = z_q, mu_d, scale_d, rows, table

    def block(self, s: int, m: int, step: int) -> torch.Tensor:
        (n_zq, dim), n_samples, dtype = self.z_q.shape, self.table.shape[1], self.mu_d.dtype
        eps = _buffer("eps", (step, n_samples, dim), self.table.dtype)
        z_d = _buffer("z_d", (step, n_samples, dim), dtype)
        sq = _buffer("sq", (step * n_samples, n_zq), dtype)
        torch.index_select(self.table, 0, self.rows[s:s + m], out=eps[:m])
        z = torch.addcmul(self.mu_d[s:s + m, None], self.scale_d[s:s + m, None],
                          eps[:m].to(dtype), out=z_d[:m]).view(-1, dim)       # [m·J, D]
        sq_d = torch.linalg.vector_norm(z, dim=-1).square_()[:, None]
        return torch.addmm(sq_d, z, self.z_q.T, alpha=-2.0, out=sq[:m * n_samples])


_buffers = threading.local()   # per thread: calls on several threads never share a buffer


def _buffer(name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A scratch tensor of at least `shape` kept between calls of this thread: a new 2 MiB
    buffer per call comes from fresh pages (mmap), and faulting them in cost as much as the
    math (the same call took 2.2 or 5.3 ms depending on the allocator's state). Below
    FIXED_BLOCK_FLOATS / 2 a fresh tensor is cheaper (malloc reuses small chunks, and the
    kept buffer's slicing and out= ops cost more than they save)."""
    size = int(np.prod(shape))
    if size < FIXED_BLOCK_FLOATS // 2:
        return torch.empty(shape, dtype=dtype)
    key = (name, dtype)
    store = getattr(_buffers, "store", None)
    if store is None:
        store = _buffers.store = {}
    if key not in store or store[key].numel() < size:
        store[key] = torch.empty(size, dtype=dtype)
    return store[key][:size].view(shape)
