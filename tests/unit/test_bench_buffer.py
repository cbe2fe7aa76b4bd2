"""benchmarks/bench_buffer.py's lines: each carries a warning on a loaded machine."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_buffer",
                                               ROOT / "benchmarks" / "bench_buffer.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_every_line_carries_the_warning_of_a_loaded_machine(monkeypatch, capsys):
    # only the CURVE capacity line had it; the ingest, hand-out and ceiling lines did not
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    bench.emit(name="raw_transport", figure=1.0)
    assert "warning" not in json.loads(capsys.readouterr().out)
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (7.6, 5.0, 5.0))
    bench.emit(name="raw_transport", figure=1.0)
    assert "load 7.6 on 2 CPUs" in json.loads(capsys.readouterr().out)["warning"]


@pytest.mark.parametrize("argv, says", [(["--fsync", "sometimes"], "--fsync"),
                                        (["--curve-io-threads", "2"], "--curve-io-threads")])
def test_a_mistaken_flag_is_refused_before_anything_runs(argv, says):
    # --fsync sometimes ran the raw round, then ended in BufferConfig's ConfigError traceback;
    # one --curve-io-threads value ran the CURVE rounds and printed no line for them
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_buffer.py"), *argv],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and says in out.stderr.splitlines()[-1]
