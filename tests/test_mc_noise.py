"""benchmarks/mc_noise.py: its overlaps are 1 where the two orders must agree."""
import numpy as np

from benchmarks.mc_noise import overlap, run


def test_overlap_counts_shared_ids_per_row():
    assert overlap(np.array([[1, 2, 3, 4], [5, 6, 7, 8]]),
                   np.array([[4, 3, 9, 9], [8, 0, 0, 0]])) == (0.5 + 0.25) / 2


def test_same_samples_and_a_whole_shortlist_agree_fully(trained):
    index = str(trained / "index")
    res = run(index, queries=4, samples=4, reference=4, shortlists=[10_000], k=5)
    assert res["exhaustive_vs_reference"] == 1.0      # the same noise table: the same estimate
    whole = res["shortlists"][10_000]                 # every image: the served order is exhaustive
    assert whole["served_vs_exhaustive"] == 1.0 and whole["reference_in_mu_shortlist"] == 1.0
