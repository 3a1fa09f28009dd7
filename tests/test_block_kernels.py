"""The compiled row kernels (engine/kernels.py) on hand-made blocks: the row bound against a
float64 brute force, the in-place scores against the contract's functions, the top-k call's
refusal of too few rows, and the batch threads' default."""
import numpy as np
import pytest

from engine.block_rows import block_row_keys
from engine.row_bounds import QueryBounds
from indexer.blocks import Block, decode_block, encode_block
from tests.test_engine_search import brute

D, K = 16, 10


@pytest.mark.parametrize("score", ("elk", "bhattacharyya"))
@pytest.mark.parametrize("spread", (0.3, 3.0))
def test_row_bound_is_above_every_rows_exact_key(score, spread):
    """The bound of every row against a float64 brute force, on rows whose variances vary per
    dimension (spread 3: e^±9 between dimensions) and per row, and queries unlike the rows."""
    rng = np.random.default_rng(7)
    n, dim = 400, 32
    mu = rng.standard_normal((n, dim)).astype(np.float32)
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    lv = (-4 + spread * rng.standard_normal((n, dim)) + rng.standard_normal((n, 1))
          ).astype(np.float16)
    # three blocks, one empty, each with its own reference: bounds come back concatenated
    cut = 137
    blocks = [decode_block(encode_block(np.arange(a, z), mu[a:z], lv[a:z]), dim,
                           row_stats=True, codes=True) for a, z in ((0, cut), (cut, n))]
    blocks.insert(1, Block(np.zeros(0, np.int64), np.zeros((0, dim), np.float32),
                           np.zeros((0, dim), np.float16)))
    pruned = []
    for _ in range(20):
        mq = rng.standard_normal(dim).astype(np.float32)
        mq /= np.linalg.norm(mq)
        lq = (-4 + spread * rng.standard_normal(dim)).astype(np.float32)
        bound = QueryBounds(score, mq, lq).blocks(blocks)
        exact = brute(score, mq, lq, mu, lv.astype(np.float32))
        assert np.all(bound >= exact - 1e-9 * np.abs(exact))
        pruned.append(np.mean(bound < np.sort(exact)[-K]))   # rows it rules out of the top k
    if spread < 1:   # a bound, and not a vacuous one
        assert np.median(pruned) > 0.4   # 0.58 measured with this seed


@pytest.mark.parametrize("score", ("elk", "bhattacharyya", "csd", "w2"))
@pytest.mark.parametrize("lv_mean, lv_sd", ((-3.0, 2.0), (-40.0, 20.0)))
def test_rows_scored_in_place_equal_the_float64_score(score, lv_mean, lv_sd):
    """engine/block_rows.py: block_row_keys reads rows of several blocks (one empty) in place,
    through the float16 exp table; against the contract's score in float64. Variances down
    to e⁻⁸⁰ and up to e⁶⁰ make the kernel's running product of s leave [1e-100, 1e100]."""
    rng = np.random.default_rng(3)
    dim, n = 62, 90    # D not a multiple of the kernel's 4-term groups
    mu = rng.standard_normal((n, dim)).astype(np.float32)
    lv = np.clip(lv_mean + lv_sd * rng.standard_normal((n, dim)), -80, 60).astype(np.float16)
    parts = [decode_block(encode_block(np.arange(a, z), mu[a:z], lv[a:z]), dim,
                          row_stats=True, codes=True) for a, z in ((0, 40), (40, n))]
    parts.insert(1, Block(np.zeros(0, np.int64), np.zeros((0, dim), np.float32),
                          np.zeros((0, dim), np.float16)))
    mq = rng.standard_normal(dim).astype(np.float32)
    lq = np.clip(lv_mean + lv_sd * rng.standard_normal(dim), -80, 60).astype(np.float32)
    rows = rng.permutation(n)[:50]
    got = block_row_keys(score, mq, lq, parts, rows)
    ref = brute(score, mq, lq, mu[rows], lv[rows].astype(np.float32))
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_search_threads_default_to_the_usable_cores(monkeypatch):
    import os
    from core.process import default_threads
    assert default_threads() == len(os.sched_getaffinity(0))
    monkeypatch.delattr(os, "sched_getaffinity")   # as on macOS
    assert default_threads() == os.cpu_count()


def test_row_bound_top_k_refuses_fewer_rows_than_k():
    rng = np.random.default_rng(0)
    mu = rng.standard_normal((5, D)).astype(np.float32)
    lv = np.full((5, D), -3.0, np.float16)
    block = decode_block(encode_block(np.arange(5), mu, lv), D, row_stats=True, codes=True)
    with pytest.raises(ValueError, match="fewer than k = 6"):
        QueryBounds("elk", mu[0], lv[0].astype(np.float32)).topk([block], 6, 6)
    rows, keys, m = QueryBounds("elk", mu[0], lv[0].astype(np.float32)).topk([block], 5, 5)
    assert rows[0] == 0 and m == 5 and sorted(rows) == list(range(5))


def test_mu_codes_error_covers_the_rounding():
    """indexer/blocks.py: mu_codes, against a float64 reconstruction: the stored error is at
    least ‖μ − scale·codes‖ and within a few of the 16-bit step; a zero row codes exactly."""
    from indexer.blocks import CODE_MAX, mu_codes
    rng = np.random.default_rng(5)
    mu = (rng.standard_normal((50, 24)) * np.exp(rng.uniform(-8, 8, (50, 1)))).astype(np.float32)
    mu[7] = 0
    codes, scale, err = mu_codes(mu)
    assert codes.dtype == np.int16 and np.abs(codes).max() == CODE_MAX
    back = codes.astype(np.float64) * scale.astype(np.float64)[:, None]
    true = np.sqrt(((mu.astype(np.float64) - back) ** 2).sum(axis=1))
    assert np.all(err >= true) and err[7] == 0 and scale[7] == 1
    step = np.abs(mu).max(axis=1) / CODE_MAX
    assert np.all(err[step > 0] <= 0.5 * step[step > 0] * np.sqrt(24) * 1.01)


@pytest.mark.parametrize("score", ("elk", "bhattacharyya"))
def test_row_bound_holds_against_the_codes_own_error(score):
    """Rows whose codes err as much as 16 bits can (one component 10⁴ times the others, so the
    step top/32767 exceeds the small ones), all variances 1 (the ρ and log-det parts of the
    bound are then exact), and each query placed along its row's rounding error δ = μ̂ − μ,
    at μ_q = μ − 2‖μ‖·δ/‖δ‖: the codes' Δμ part then exceeds the true one by ~4w‖μ‖‖δ‖,
    about three times the float32 slack, so only the stored error keeps the bound above."""
    rng = np.random.default_rng(11)
    n, dim = 60, 64
    mu = (0.01 * rng.standard_normal((n, dim))).astype(np.float32)
    mu[:, 0] = 100.0
    lv = np.zeros((n, dim), np.float16)
    block = decode_block(encode_block(np.arange(n), mu, lv), dim, row_stats=True, codes=True)
    back = block.codes.astype(np.float64) * block.code_scale.astype(np.float64)[:, None]
    for i in range(0, n, 6):
        delta = back[i] - mu[i]
        mq = (mu[i] - 2 * np.linalg.norm(mu[i]) * delta / np.linalg.norm(delta)).astype(np.float32)
        lq = np.zeros(dim, np.float32)
        bound = QueryBounds(score, mq, lq).blocks([block])
        exact = brute(score, mq, lq, mu, lv.astype(np.float32))
        assert bound[i] >= exact[i] - 1e-9 * abs(exact[i])


@pytest.mark.parametrize("codes", (True, False))
def test_block_table_search_equals_brute_force_on_unaligned_blocks(codes):
    """engine/block_table.py: a block whose value starts 2 bytes off an 8-byte boundary (as a
    small LMDB value can) is copied into aligned arrays before the kernel reads it through its
    address; the top k over that block, an empty one and an aligned one equals a float64 brute
    force over all their rows, hits' μ and log variances included; with and without codes."""
    from engine.block_table import BlockTable
    from engine.row_bounds import QueryTerms
    rng = np.random.default_rng(2)
    n, dim, k = 70, 24, 7
    mu = rng.standard_normal((n, dim)).astype(np.float32)
    lv = (-3 + rng.standard_normal((n, dim))).astype(np.float16)
    raw = encode_block(np.arange(30), mu[:30], lv[:30], codes=codes)
    shifted = np.frombuffer(b"\0\0" + raw, np.uint8)[2:]   # ids at an address ≡ 2 mod 8
    blocks = [decode_block(shifted, dim, row_stats=True, codes=codes),
              Block(np.zeros(0, np.int64), np.zeros((0, dim), np.float32),
                    np.zeros((0, dim), np.float16)),
              decode_block(encode_block(np.arange(30, n), mu[30:], lv[30:], codes=codes), dim,
                           row_stats=True, codes=codes)]
    assert not blocks[0].ids.flags.aligned
    table, numbers = BlockTable.of_blocks(blocks)
    from engine.table_kernels import FIELDS
    sizes = [getattr(blocks[2], name).itemsize for name in FIELDS]   # each array's alignment
    assert np.all(table.addresses[[0, 2]] % sizes == 0) and table.rows.tolist() == [30, 0, 40]
    assert table.code_type is (np.int16 if codes else np.float32)
    mq = rng.standard_normal((3, dim)).astype(np.float32)
    lq = (-3 + rng.standard_normal((3, dim))).astype(np.float32)
    out = (np.empty((3, k), np.int64), np.empty((3, k, dim), np.float32),
           np.empty((3, k, dim), np.float16), np.empty((3, k), np.float32), np.empty(3, np.int64))
    QueryTerms("elk", mq, lq).topk(table, np.tile(numbers, (3, 1)), 10, k, out)
    for q in range(3):
        ref = brute("elk", mq[q], lq[q], mu, lv.astype(np.float32))
        np.testing.assert_allclose(out[3][q], np.sort(ref)[::-1][:k], rtol=1e-5)
        np.testing.assert_array_equal(out[0][q], np.argsort(-ref, kind="stable")[:k])
        np.testing.assert_array_equal(out[1][q], mu[out[0][q]])
        np.testing.assert_array_equal(out[2][q], lv[out[0][q]])
        assert k <= out[4][q] <= n


def test_block_table_refuses_blocks_of_two_code_types():
    from engine.block_table import BlockTable
    rng = np.random.default_rng(4)
    mu = rng.standard_normal((8, D)).astype(np.float32)
    lv = np.full((8, D), -3.0, np.float16)
    blocks = [decode_block(encode_block(np.arange(4), mu[:4], lv[:4], codes=c), D,
                           row_stats=True, codes=c) for c in (True, False)]
    with pytest.raises(ValueError, match="list 1: codes of float32, the others int16"):
        BlockTable.of_blocks(blocks)
