"""benchmarks/scale.py: the fitted growth exponent and the cost-curve plot's label placement."""
import numpy as np
import pytest

from benchmarks.scale import _spread, growth_exponents, plot_scale


def _rows(exponents: dict) -> list[dict]:
    return [{"n": n, "dim": 8,
             "scores": {s: {"p50_ms": 0.5 * n ** b} for s, b in exponents.items()}}
            for n in (10**5, 10**6, 10**7)]


def test_growth_exponent_recovers_a_power_law():
    got = growth_exponents(_rows({"mu": 0.0, "elk": 0.25, "mc": 1.0}))
    assert np.allclose([got["mu"], got["elk"], got["mc"]], [0.0, 0.25, 1.0], atol=1e-3)


def test_labels_keep_their_gap_and_their_order():
    ys = [100.0, 101.0, 102.5, 200.0, 50.0]
    out = _spread(ys, 12)
    assert out[3] == 200.0 and out[4] == 50.0               # far from the others: unmoved
    crowded = sorted(out[:3])
    assert crowded == out[:3] and np.all(np.diff(crowded) >= 12)   # same order, 12 apart
    assert all(o >= y for o, y in zip(out, ys))             # only ever pushed down


def test_plot_is_written(tmp_path):
    path = plot_scale(_rows({"mu": 0.0, "elk": 0.0, "mc": 0.001}), tmp_path / "scale.png")
    assert path.stat().st_size > 1000


@pytest.mark.slow
def test_the_cost_curve_command_measures_every_size(tmp_path):
    """`python -m benchmarks.scale` end to end on two tiny sizes: one child per size, the
    JSON record with a growth exponent per score, and the plot."""
    import json
    import subprocess
    import sys
    out, plot = tmp_path / "scale.json", tmp_path / "scale.png"
    done = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--sizes", "3000,6000",
                           "--dim", "8", "--queries", "8", "--scores", "mu,elk",
                           "--workdir", str(tmp_path / "work"), "--out", str(out),
                           "--plot", str(plot)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [r["n"] for r in result["sizes"]] == [3000, 6000]
    assert set(result["p50_growth_exponent"]) == {"mu", "elk"}
    assert all(r["scores"]["elk"]["recall@10"] == 1.0 for r in result["sizes"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
