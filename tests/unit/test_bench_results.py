"""benchmarks/results.py: the last line per benchmark name across the kept JSON lines, as the
Markdown table the results page is checked against."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _results():
    spec = importlib.util.spec_from_file_location("bench_results", BENCH / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_the_last_line_of_a_name_wins_and_bad_lines_are_skipped(tmp_path, capsys):
    results = _results()
    a = _write(tmp_path / "a.jsonl", [
        {"name": "x", "figure": 1.0, "unit": "s", "baseline": 2.0, "ratio": 2.0, "goal": 1.5},
        "not json", {"figure": 3}, {"name": "y", "figure": 5, "unit": "ms"}])
    b = _write(tmp_path / "b.jsonl", [{"name": "x", "figure": 0.5, "unit": "s", "baseline": 2.0,
                                       "ratio": 4.0, "goal": "figure <= 1 | s"}])
    latest = results.latest_lines([a, b])
    assert latest["x"] == ({"name": "x", "figure": 0.5, "unit": "s", "baseline": 2.0, "ratio": 4.0,
                            "goal": "figure <= 1 | s"}, "b.jsonl")
    assert set(latest) == {"x", "y"}
    assert capsys.readouterr().err.count("not a benchmark line") == 2
    rows = results.table(latest).splitlines()
    assert rows[0] == "| name | figure | unit | baseline | ratio | goal | file |"
    assert rows[2] == "| x | 0.5 | s | 2 | 4 | figure <= 1 \\| s | b.jsonl |"
    assert rows[3] == "| y | 5 | ms |  |  |  | a.jsonl |"


def test_every_kept_jsonl_file_reads(capsys):
    results = _results()
    assert results.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| name |") and "vs_trl_samples_per_s_user_path" in out
