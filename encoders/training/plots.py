"""`eval --plot`: t2i R@1 per caption-uncertainty bin, the x axis labelled with each bin's Σσ²
range so the picture reads without the JSON."""
from __future__ import annotations

from pathlib import Path

from core.charts import bar_chart


def plot_uncertainty(report: dict, path: str | Path) -> Path:
    """Bars of R@1 per equal-count bin of caption Σσ² (low -> high), each labelled with the
    bin's upper Σσ²."""
    unc = report["uncertainty"]
    bins = unc["bins"]
    labels = [f"{b['var_hi']:.3g}" for b in bins]
    return bar_chart([b["R@1"] for b in bins], labels,
                     f"t2i R@1 per caption Σσ² bin ({unc['score']}; Spearman(Σσ², true matches) "
                     f"{unc['spearman_caption_var_vs_matches']:.2f})", path,
                     xlabel=f"caption Σσ², upper edge of each bin ({len(bins)} equal-count bins, "
                            f"from {bins[0]['var_lo']:.3g})",
                     ylabel="t2i R@1")
