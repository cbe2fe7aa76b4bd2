"""benchmarks/bench_buffer.py's lines: each carries a warning on a loaded machine."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

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
