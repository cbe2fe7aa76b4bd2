"""bench_async.py's ``speedup_line``, runs faked: its refusals and where a run's directory goes."""

from __future__ import annotations

import argparse
import importlib.util
import re
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_async",
                                               ROOT / "benchmarks" / "bench_async.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.fixture(autouse=True)
def _two_cores_and_a_private_tmp(monkeypatch, tmp_path):
    monkeypatch.setattr(bench.os, "sched_getaffinity", lambda _pid: {0, 1})
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def records(steps: int) -> list[dict]:
    return [{"step": k, "time": float(k), "seqs": 16, "staleness_mean": 0.0,
             "phase_seconds": {"fetch_batch": 0.5, "train_step": 0.5}} for k in range(1, steps + 1)]


def test_a_skip_leaving_no_steps_or_a_keep_directory_of_earlier_runs_is_refused_before_any_run(
        tmp_path):
    def never(*_):
        raise AssertionError("ran")

    for steps, skip in ((3, 2), (6, 6), (6, -1)):
        with pytest.raises(SystemExit, match="--skip"):
            bench.speedup_line("x", "bench_", never, argparse.Namespace(steps=steps, skip=skip,
                                                                         keep=None))
    # resumed finished runs would print their old records as a new measurement
    (tmp_path / "eta0").mkdir()
    with pytest.raises(SystemExit, match="eta0 exist from an earlier run"):
        bench.speedup_line("x", "bench_", never,
                           argparse.Namespace(steps=6, skip=2, keep=str(tmp_path)))


def test_a_failed_run_keeps_the_logs_its_message_names_and_a_finished_one_leaves_nothing(
        tmp_path):
    def failing(run_dir: Path, eta: int, _args):
        (run_dir / "logs").mkdir(parents=True)
        raise SystemExit(f"eta={eta} run failed; logs in {run_dir / 'logs'}")

    args = argparse.Namespace(steps=6, skip=2, keep=None)
    with pytest.raises(SystemExit) as failed:
        bench.speedup_line("x", "bench_", failing, args)
    logs = Path(re.search(r"logs in (\S+)", str(failed.value)).group(1))
    assert logs.is_dir() and tmp_path in logs.parents

    def fine(run_dir: Path, _eta: int, _args):
        run_dir.mkdir(parents=True)
        return records(6)

    before = set(tmp_path.iterdir())
    line = bench.speedup_line("x", "bench_", fine, args)
    assert line["figure"] == 1.0 and set(tmp_path.iterdir()) == before
