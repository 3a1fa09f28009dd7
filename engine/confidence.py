"""How much to trust a query's results: the σ → expected-R@1 calibration eval measured.

`eval` (and the evaluation at the end of `train`) measures R@1 per decile of the queries' total
variance Σσ², for text queries and image queries separately; the index build copies that table
into the index manifest ("calibration") when eval ran on the checkpoint the index was built
with. A query's confidence is the R@1 that queries of its Σσ² reached: the table read by linear
interpolation between the deciles' mean Σσ² (clamped at the ends). Below LOW_CONFIDENCE the
result is flagged, so a user knows to rephrase or to look further down the list.
"""
from __future__ import annotations

import numpy as np

LOW_CONFIDENCE = 0.5   # expected R@1 below which a query is flagged low_confidence


class Calibration:
    """Expected R@1 as a function of a query's Σσ², for one query modality."""

    def __init__(self, var: np.ndarray, r1: np.ndarray):
        order = np.argsort(var)
        self.var, self.r1 = np.asarray(var, float)[order], np.asarray(r1, float)[order]

    @classmethod
    def from_manifest(cls, manifest: dict, query_modality: str) -> "Calibration | None":
        """The index manifest's table for queries of `query_modality` ("text" or "image"),
        or None when the index has none (eval did not run on its checkpoint)."""
        table = manifest.get("calibration", {}).get(query_modality)
        if not table or not table.get("bins"):
            return None
        bins = table["bins"]
        return cls(np.array([b["var_mean"] for b in bins]), np.array([b["R@1"] for b in bins]))

    def expected_r1(self, total_var: float) -> float:
        return float(np.interp(total_var, self.var, self.r1))
