"""benchmarks/soak.py: what a sample reads and the flatness summary built from samples."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"
_spec = importlib.util.spec_from_file_location("soak", _PATH)
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)


def test_proc_status_reads_rss_fds_and_threads_of_a_live_process_and_none_once_gone():
    st = soak.proc_status(os.getpid())
    assert st["pid"] == os.getpid() and st["rss_kb"] > 1000 and st["threads"] >= 1
    with open(__file__):  # one more descriptor is seen
        assert soak.proc_status(os.getpid())["fds"] == st["fds"] + 1
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert soak.proc_status(child.pid) is None


def test_disk_entries_group_rotated_files_with_theirs_and_write_once_files_as_other(tmp_path):
    for rel, size in {"logs/trainer.log": 10, "logs/trainer.log.1": 20, "logs/buffer.log": 3,
                      "metrics/scrape.jsonl.2": 7, "metrics/trainer.jsonl": 5,
                      "checkpoints/v00000050/model.pt": 100, "samples.jsonl": 4,
                      "config.yaml": 1, "keys/server.key": 2}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x" * size)
    assert soak.disk_usage(tmp_path) == {
        "logs/trainer.log": 30, "logs/buffer.log": 3, "metrics/scrape.jsonl": 7,
        "metrics/trainer.jsonl": 5, "checkpoints": 100, "samples.jsonl": 4, "other": 3}


def test_last_version_is_the_last_complete_record_even_past_a_torn_line(tmp_path):
    path = tmp_path / "trainer.jsonl"
    assert soak.last_version(path) is None
    rows = [json.dumps({"policy_version": v, "pad": "y" * 300}) for v in range(1, 60)]
    path.write_text("\n".join(rows) + '\n{"policy_version": 60, "pa')  # a record being written
    assert soak.last_version(path, tail_bytes=1000) == 59


def test_job_processes_names_the_supervisor_each_daemon_and_their_descendants(tmp_path):
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)']); print('up', flush=True); time.sleep(60)")
    daemon = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert daemon.stdout.readline() == "up\n"  # its child is started
        (tmp_path / "ports.json").write_text(json.dumps(
            {"daemons": [{"name": "buffer", "pid": daemon.pid}, {"name": "trainer", "pid": None}]}))
        procs = soak.job_processes(tmp_path, os.getpid())
        assert procs["supervisor"] == os.getpid() and procs["buffer"] == daemon.pid
        kids = [n for n in procs if n.startswith("buffer/")]
        assert len(kids) == 1 and "trainer" not in procs
        grandchild = procs[kids[0]]
    finally:
        daemon.kill()
        daemon.wait()
    os.kill(grandchild, 9)


def _samples(n: int = 41, rss=lambda i: 100_000, wal=lambda i: 1000, log=lambda i: 50 * i) -> list:
    """n samples 10 s apart, 100 versions apart; the first one before any trained version."""
    return [{"t": 10.0 * i, "version": None if i == 0 else 100 * i, "load": 0.5,
             "procs": {"trainer": {"pid": 7, "rss_kb": rss(i), "fds": 20, "threads": 3}},
             "disk": {"wal": wal(i), "logs/trainer.log": log(i) % 3000,
                      "metrics/trainer.jsonl": 1200 * i}} for i in range(n)]


def test_phases_start_at_the_first_trained_version_and_warm_up_is_a_fraction_of_the_span():
    ph = soak.phases(_samples(), warmup_frac=0.25, window_frac=0.1)
    assert ((ph["start"], ph["end"], ph["warm"], ph["window"], ph["mid"])
            == (10, 400, 107.5, 39, 205))
    with pytest.raises(ValueError):
        soak.phases(_samples(2), 0.25, 0.1)


def test_summary_passes_flat_figures_and_flags_a_leak_and_an_unbounded_entry():
    by_name = {c["name"]: c for c in soak.summarize(_samples(), cores=2, rotate_bytes=3000)}
    run = by_name["soak_run"]
    assert run["versions"] == 3900 and run["figure"] == 6.5 and "warning" not in run
    rss = by_name["soak_rss/trainer"]
    assert rss["ratio"] == 1.0 and rss["per_1000_versions"] == 0.0 and rss["end"] == 97.66
    assert by_name["soak_fds/trainer"]["ratio"] == 1.0
    assert by_name["soak_disk/wal"]["ratio"] == 1.0 and by_name["soak_disk/wal"]["figure"] == 0.0
    log = by_name["soak_disk/logs/trainer.log"]  # rotated: the bound against the largest size
    assert log["ratio"] == 3000 / 2000 and log["goal"].startswith("rotated")
    records = by_name["soak_disk/metrics/trainer.jsonl"]  # 12 bytes a version: 12,000 per 1,000
    assert records["figure"] == round(12_000 / 1024, 2)
    assert records["gpu_mb_per_day"] == round(12 * 2880 / 2**20, 2)

    leak = {c["name"]: c for c in soak.summarize(
        _samples(rss=lambda i: 100_000 + 2_000 * i, wal=lambda i: 1000 * i), cores=2)}
    assert leak["soak_rss/trainer"]["ratio"] < soak.GOAL_RATIO  # 0.56: 101,000 / 180,000 KB
    assert leak["soak_rss/trainer"]["per_1000_versions"] == round(20_000 / 1024, 3)
    assert leak["soak_disk/wal"]["ratio"] < soak.GOAL_RATIO


def test_a_checkpoint_caught_while_written_is_not_growth_and_a_loaded_machine_warns_every_line():
    samples = _samples()
    samples[-3]["disk"]["wal"] = 1500  # one sample: the new one written before the oldest goes
    samples[5]["load"] = 9.0
    cases = soak.summarize(samples, cores=2)
    wal = {c["name"]: c for c in cases}["soak_disk/wal"]
    assert wal["ratio"] == 1.0 and wal["max_kb"] == round(1500 / 1024, 1)
    assert all("load average up to 9.0 on 2 cores" in c["warning"] for c in cases)


def test_a_leak_under_the_ratio_fails_the_week_budget_and_a_few_files_fail_the_absolute_bound():
    """4 KB a version on 400 MB passes the ratio but is 79 MB a week; 3 more fds of 50 pass too."""
    samples = _samples(rss=lambda i: 400_000 + 4 * 100 * i)  # 4 KB a version, 100 versions a sample
    for i, s in enumerate(samples):
        s["procs"]["trainer"]["fds"] = 50 + (3 if i > 30 else 0)
    by_name = {c["name"]: c for c in soak.summarize(samples, cores=2)}
    assert by_name["soak_rss/trainer"]["ratio"] >= soak.GOAL_RATIO
    week = by_name["soak_rss_week/trainer"]
    assert week["figure"] == pytest.approx(4 / 1.024 * 20.16, abs=0.1) and week["baseline"] == 64
    assert week["ratio"] < 1
    fds = by_name["soak_fds/trainer"]
    assert fds["ratio"] >= soak.GOAL_RATIO and fds["growth"] == 3 > soak.FD_GROWTH_MAX
    half = {c["name"]: c for c in soak.summarize(_samples(rss=lambda i: 400_000 + 2 * 100 * i),
                                                  cores=2)}  # 2 KB a version: 39 MB a week
    assert half["soak_rss_week/trainer"]["ratio"] >= 1
    flat = {c["name"]: c for c in soak.summarize(_samples(), cores=2)}
    assert flat["soak_rss_week/trainer"]["figure"] == 0.0
    assert flat["soak_rss_week/trainer"]["ratio"] == 640  # no growth counts as 0.1 MB
    assert flat["soak_fds/trainer"]["growth"] == 0


def test_a_root_given_keeps_what_it_held_and_too_short_a_run_says_why(monkeypatch, tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "precious.txt").write_text("not the soak's")

    def short(run_root: Path, _args) -> list[dict]:
        (run_root / "run").mkdir()
        return [{"t": 0.0, "version": None, "procs": {}, "disk": {}}]

    monkeypatch.setattr(soak, "soak", short)
    monkeypatch.setattr(sys, "argv", ["soak.py", "--minutes", "1", "--root", str(root),
                                      "--samples", str(tmp_path / "s.jsonl")])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit, match="nothing to summarize"):
            soak.main()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert (root / "precious.txt").read_text() == "not the soak's"
    assert not (root / "run").exists()
