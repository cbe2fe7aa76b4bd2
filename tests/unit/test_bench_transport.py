"""benchmarks/transport_report.py: the lines bench_transport.py prints, from rates made by hand."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import transport_report  # noqa: E402


def test_the_same_node_line_has_every_key_the_readme_names():
    # it had no goal: README, "Each script prints one JSON line (name, figure, unit, baseline,
    # ratio, goal, ...)"
    rates = {("stream", "local"): [900.0], ("stream", "ours"): [800.0],
             ("stream", "curve"): [300.0]}
    line = transport_report.local_line(4096, rates, lambda _key: 100.0, rounds=1, seconds=0.35)
    assert {"name", "figure", "unit", "baseline", "ratio", "goal"} <= line.keys()
    assert (line["figure"], line["baseline"], line["ratio"]) == (900.0, 800.0, 1.125)
