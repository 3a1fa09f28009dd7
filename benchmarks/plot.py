"""Latency-versus-recall chart of a bench report, drawn with Pillow (no plotting library is
installed): one point per score, x = p50 latency in ms (log scale), y = recall@10."""
from __future__ import annotations

import logging
import math
from pathlib import Path

from PIL import Image, ImageDraw

from core.charts import draw_text, save_png

logger = logging.getLogger(__name__)

W, H, PAD = 720, 480, 60
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def plot_latency_recall(report: dict, path: Path) -> Path:
    points = [(name, s["p50_ms"], s["recall@10"]) for name, s in report["scores"].items()]
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    lo = math.log10(max(min(p[1] for p in points), 1e-3)) - 0.2
    hi = math.log10(max(max(p[1] for p in points), 1e-3)) + 0.2
    y_lo = min(0.9, min(p[2] for p in points) - 0.01)
    y_hi = 1.0 + 0.12 * (1.0 - y_lo)  # headroom: points at recall 1 sit inside the frame

    def xy(ms, recall):
        x = PAD + (math.log10(max(ms, 1e-3)) - lo) / (hi - lo) * (W - 2 * PAD)
        y = H - PAD - (recall - y_lo) / (y_hi - y_lo) * (H - 2 * PAD)
        return x, y

    draw.rectangle([PAD, PAD, W - PAD, H - PAD], outline="black")
    for e in range(math.ceil(lo), math.floor(hi) + 1):  # decade ticks
        x, _ = xy(10 ** e, y_lo)
        draw.line([x, H - PAD, x, H - PAD + 5], fill="black")
        draw_text(draw, (x, H - PAD + 8), f"{10 ** e:g}", anchor="ma")
    for r in (y_lo, (y_lo + 1) / 2, 1.0):
        _, y = xy(10 ** lo, r)
        draw.line([PAD - 5, y, PAD, y], fill="black")
        draw_text(draw, (PAD - 8, y - 6), f"{r:.3f}", anchor="ra")
    draw_text(draw, (W // 2, H - 24), "p50 latency per query (ms, log scale)", anchor="ma")
    draw_text(draw, (8, PAD - 18), "recall@10 against exact search")
    draw_text(draw, (W // 2, 10), f"latency vs recall: N={report['n']} D={report['dim']} "
                                  f"{report['factory']}", anchor="ma")
    for i, (name, ms, recall) in enumerate(points):  # every point first: labels go on top
        x, y = xy(ms, recall)
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=COLOURS[i % len(COLOURS)])
    taken: list[tuple[float, float]] = []
    for i, (name, ms, recall) in enumerate(points):
        x, y = xy(ms, recall)
        colour = COLOURS[i % len(COLOURS)]
        label_y = y - 6
        while any(abs(label_y - ty) < 13 and abs(x - tx) < 90 for tx, ty in taken):
            label_y += 13  # points that coincide get their labels stacked, not overprinted
        label_y = min(label_y, H - PAD - 14)
        right_side = x + 8 + 7 * len(name) < W - PAD
        draw_text(draw, (x + 8 if right_side else x - 8, label_y), name, fill=colour,
                  anchor="la" if right_side else "ra")
        taken.append((x, label_y))
    save_png(img, path)
    logger.info("wrote %s", path)
    return path
