"""Every benchmark line's ``ratio`` is higher-is-better and a numeric ``goal`` is on its scale, so
``ratio >= goal`` passes on every line (benchmarks/README.md); the lines whose figure is better
smaller give baseline / figure."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script, builder, better, worse", [
    # (trainer s, plain s): a trainer step faster than the plain one beats its baseline
    ("bench_train_step", "step_line", (0.09, 0.10), (0.20, 0.10)),
    # (overlapped ms, blocking ms): the trainer blocked for less than the blocking push
    ("bench_weight_sync", "blocked_line", (0.008, 0.40), (0.50, 0.40)),
])
def test_a_smaller_figure_than_the_baseline_gives_a_ratio_above_1(script, builder, better, worse):
    build = getattr(_load(script), builder)
    good, bad = build(*better), build(*worse)
    assert good["figure"] < good["baseline"] and good["ratio"] > 1
    assert bad["figure"] > bad["baseline"] and bad["ratio"] < 1
    if isinstance(good["goal"], float):
        assert good["ratio"] >= good["goal"] > bad["ratio"]  # 1.3x slower fails 1 / 1.3


def test_the_endpoint_overhead_ratio_grows_as_the_overhead_shrinks():
    line = _load("bench_agentic").overhead_line
    small, large = line(13.6, 14.0), line(13.6, 27.2)  # (direct ms, through the endpoint ms)
    assert small["figure"] < large["figure"] and small["ratio"] > large["ratio"]
    assert large["ratio"] == 0.5


def test_the_memory_band_is_one_ratio_that_the_estimate_high_or_low_fails_alike():
    line = _load("bench_trainer_memory").memory_line
    gib = 2**30
    close, high, low = line(gib, int(1.02 * gib)), line(int(1.3 * gib), gib), line(gib, 1.3 * gib)
    assert close["ratio"] >= close["goal"] == 0.87
    assert high["ratio"] == low["ratio"] == round(1 / 1.3, 3) < high["goal"]
    assert (high["measured_over_estimate"], low["measured_over_estimate"]) == (1.3, 0.769)


@pytest.mark.parametrize("clean, chaos, ratio", [(0.1, 0.05, 2.0), (0.1, 0.2, 0.5),
                                                 (0.1, 0.3, 0.33), (0.0, 0.0, 1.0)])
def test_the_chaos_ratio_is_the_clean_waste_over_the_chaos_waste(
        monkeypatch, tmp_path, capsys, clean, chaos, ratio):
    bench = _load("bench_chaos")
    shares = {False: clean, True: chaos}
    monkeypatch.setattr(bench, "run", lambda _d, _a, chaos: {"wasted_share": shares[chaos]})
    monkeypatch.setattr(sys, "argv", ["bench_chaos.py", "--root", str(tmp_path)])
    bench.main()
    line = json.loads(capsys.readouterr().out)
    assert line["ratio"] == ratio and (ratio >= line["goal"]) == (chaos <= 2 * clean)


def test_no_published_line_states_its_goal_lower_is_better_or_without_what_it_bounds():
    """A goal is null, a number (ratio >= goal) or a string naming what it bounds: "<= 0.05" left
    the reader to guess which field, "ratio <= 1.1" read the other way round."""
    seen = 0
    for path in BENCH.glob("*.jsonl"):
        for text in path.read_text().splitlines():
            goal = json.loads(text).get("goal") if text.strip() else None
            seen += 1
            if isinstance(goal, str):
                assert not re.match(r"\s*[<>]=", goal), (path.name, goal)
                assert not re.search(r"ratio <=|/ bound <=", goal), (path.name, goal)
    assert seen > 100
