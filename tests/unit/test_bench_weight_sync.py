"""benchmarks/bench_weight_sync.py --system, with the real system's runs faked: what it refuses
before running, and where a failed run's logs stay."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_weight_sync.py"
_spec = importlib.util.spec_from_file_location("bench_weight_sync", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("argv, says", [(["--lora", "8"], "--system"),
                                        (["--system", "--steps", "5", "--skip", "5"], "--skip")])
def test_flags_that_measure_nothing_are_refused_before_any_run(argv, says):
    # --lora without --system ran the broadcast benchmark instead; a --skip of every step ran
    # both systems, then took the median of nothing (StatisticsError)
    out = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and says in out.stderr.splitlines()[-1]


@pytest.mark.parametrize("lora", [0, 8])
def test_a_failed_run_keeps_the_logs_its_message_names(monkeypatch, tmp_path, lora):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def failing(run_dir: Path, overlap: bool, *_):
        (run_dir / "logs").mkdir(parents=True)
        raise SystemExit(f"overlap={overlap} run failed; logs in {run_dir / 'logs'}")

    monkeypatch.setattr(bench, "system_run", failing)
    args = argparse.Namespace(steps=6, skip=2, eta=4, lora=lora, blocking=False, hidden=64,
                              layers=1)
    with pytest.raises(SystemExit) as failed:
        (bench.system_lora if lora else bench.system_blocked)(args)
    assert Path(str(failed.value).rsplit("logs in ", 1)[1]).is_dir()
