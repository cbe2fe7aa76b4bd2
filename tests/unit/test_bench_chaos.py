"""benchmarks/bench_chaos.py's JSON line and run directories, with its two runs faked."""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_chaos",
                                               ROOT / "benchmarks" / "bench_chaos.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_the_line_has_the_documented_keys_and_a_temporary_root_is_removed(
        monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def run(run_dir: Path, _args, chaos: bool) -> dict:
        (run_dir / "logs").mkdir(parents=True)
        return {"wasted_share": 0.2 if chaos else 0.1}

    monkeypatch.setattr(bench, "run", run)
    monkeypatch.setattr(sys, "argv", ["bench_chaos.py", "--steps", "30"])
    bench.main()
    line = json.loads(capsys.readouterr().out)
    # README: every script prints name, figure, unit, baseline, ratio, goal
    assert {"name", "figure", "unit", "baseline", "ratio", "goal"} <= line.keys()
    assert (line["figure"], line["baseline"], line["ratio"]) == (0.2, 0.1, 0.5)  # twice the waste
    assert list(tmp_path.iterdir()) == []  # 23 MB of checkpoints and WAL were left in /tmp


def test_a_failed_run_keeps_its_logs_and_a_given_root_is_kept(monkeypatch, tmp_path):
    def failing(run_dir: Path, _args, chaos: bool) -> dict:
        (run_dir / "logs").mkdir(parents=True)
        raise SystemExit(f"clean run failed; logs in {run_dir / 'logs'}")

    monkeypatch.setattr(bench, "run", failing)
    monkeypatch.setattr(sys, "argv", ["bench_chaos.py", "--root", str(tmp_path / "r")])
    with pytest.raises(SystemExit) as failed:
        bench.main()
    assert Path(str(failed.value).rsplit("logs in ", 1)[1]).is_dir()


def test_a_loaded_machine_still_gets_its_line_with_a_warning(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "run", lambda run_dir, _a, chaos: {"wasted_share": 0.1})
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(sys, "argv", ["bench_chaos.py", "--root", str(tmp_path)])
    bench.main()
    assert "loaded machine" in json.loads(capsys.readouterr().out)["warning"]
