"""engine/probe.py: a batch's lists against the quantizer's own search, and the compiled
top-n against a stable sort."""
import faiss
import numpy as np

from engine.kernels import top_columns
from engine.probe import BLAS_PROBE_MIN, probe_lists
from indexer.lists import ListBlocks
from indexer.reader import IndexReader
from tests.test_list_blocks import D, NLIST, NPROBE, built, index, queries  # noqa: F401 (fixtures)


def test_batch_probe_picks_the_quantizers_lists(index, queries):
    """A batch picks its lists from one product with the centroids and a compiled top-n
    (engine/probe.py); the quantizer's own search is the reference, for the index's
    inner-product quantizer and for an L2 one over the same centroids."""
    mu_q = queries[0]
    assert len(mu_q) >= BLAS_PROBE_MIN
    with IndexReader.open(index) as r:
        blocks = r.list_blocks("image")
        keys = blocks.centroid_keys(mu_q)
        assert keys.shape == (len(mu_q), NLIST)
        np.testing.assert_array_equal(probe_lists(blocks, mu_q), blocks.probe(mu_q))
        centroids = blocks.ivf.quantizer.reconstruct_n(0, NLIST)
    l2 = faiss.IndexIVFFlat(faiss.IndexFlatL2(D), D, NLIST, faiss.METRIC_L2)
    l2.train(np.concatenate([centroids] * 4))
    view = ListBlocks.__new__(ListBlocks)   # the probe needs only the index and nprobe
    view.ivf, view.nprobe, view._centroids = l2, NPROBE, None
    np.testing.assert_array_equal(probe_lists(view, mu_q), l2.quantizer.search(mu_q, NPROBE)[1])
    assert not np.allclose(view.centroid_keys(mu_q), keys)


def test_top_columns_against_a_stable_sort():
    rng = np.random.default_rng(2)
    keys = rng.integers(0, 6, (40, 30)).astype(np.float32)   # many ties
    for n in (1, 3, 30):
        out = np.empty((40, n), np.int64)
        top_columns(keys, n, out)
        np.testing.assert_array_equal(out, np.argsort(-keys, axis=1, kind="stable")[:, :n])
