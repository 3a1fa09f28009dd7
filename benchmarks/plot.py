"""Latency-versus-recall chart of a bench report, drawn with Pillow (no plotting library is
installed): one point per score, x = p50 latency in ms (log scale), y = recall@10."""
from __future__ import annotations

import logging
import math
from pathlib import Path

from PIL import Image, ImageDraw

from core.charts import save_png

logger = logging.getLogger(__name__)

W, H, PAD = 720, 480, 60
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def plot_latency_recall(report: dict, path: Path) -> Path:
    points = [(name, s["p50_ms"], s["recall@10"]) for name, s in report["scores"].items()]
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    lo = math.log10(max(min(p[1] for p in points), 1e-3)) - 0.2
    hi = math.log10(max(p[1] for p in points)) + 0.2
    y_lo = min(0.9, min(p[2] for p in points) - 0.01)

    def xy(ms, recall):
        x = PAD + (math.log10(max(ms, 1e-3)) - lo) / (hi - lo) * (W - 2 * PAD)
        y = H - PAD - (recall - y_lo) / (1.0 - y_lo + 1e-9) * (H - 2 * PAD)
        return x, y

    draw.rectangle([PAD, PAD, W - PAD, H - PAD], outline="black")
    for e in range(math.ceil(lo), math.floor(hi) + 1):  # decade ticks
        x, _ = xy(10 ** e, y_lo)
        draw.line([x, H - PAD, x, H - PAD + 5], fill="black")
        draw.text((x - 10, H - PAD + 8), f"{10 ** e:g}", fill="black")
    for r in (y_lo, (y_lo + 1) / 2, 1.0):
        _, y = xy(10 ** lo, r)
        draw.text((8, y - 6), f"{r:.3f}", fill="black")
    draw.text((W // 2 - 60, H - 25), "p50 latency (ms, log)", fill="black")
    draw.text((8, 20), f"recall@10 vs exact - N={report['n']} D={report['dim']} "
                       f"{report['factory']}", fill="black")
    for i, (name, ms, recall) in enumerate(points):
        x, y = xy(ms, recall)
        colour = COLOURS[i % len(COLOURS)]
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=colour)
        draw.text((x + 8, y - 6 - 12 * (i % 3)), name, fill=colour)
    save_png(img, path)
    logger.info("wrote %s", path)
    return path
