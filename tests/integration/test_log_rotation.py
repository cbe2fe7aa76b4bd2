"""Daemon logs and metrics/scrape.jsonl rotate: a 4 KB limit with 2 backups holds the newest
lines in order, none over by more than a line; run's /metrics scrape rotates the same way.
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys
import threading
from pathlib import Path

import pytest

from areal_like.net.metrics import Metrics, MetricsServer
from areal_like.settings.schema import RunConfig
from launch.job import Monitor
from launch.local import ProcSpec, Supervisor
from launch.topology import DaemonSlot, Topology
from tests.conftest import wait_until

LINES = 3000
CHATTY = (f"import time\nfor i in range({LINES}): "
          f"print(f'line {{i:05d}} ' + 'x' * 20, flush=True)\ntime.sleep(600)")


def _text(path: Path) -> str:
    """The file's text, or '' while it does not exist (rotation renames it first)."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _lines(files: list[Path]) -> list[str]:
    return [ln for f in files for ln in f.read_text().splitlines() if ln.startswith("line ")]


@pytest.mark.slow
def test_a_daemon_log_rotates_and_keeps_the_newest_lines(tmp_path):
    run_dir, limit = tmp_path / "run", 4096
    sup = Supervisor([ProcSpec(name="chatty", argv=[sys.executable, "-c", CHATTY])], run_dir,
                     echo=lambda _: None,
                     log_max_bytes=limit, log_backups=2)
    thread = threading.Thread(target=sup.run, daemon=True)
    thread.start()
    log = run_dir / "logs" / "chatty.log"
    try:
        wait_until(lambda: f"line {LINES - 1:05d}" in _text(log), 120, 0.1,
                   "the last line in chatty.log")
    finally:
        sup.request_stop()
        thread.join(timeout=60)
    assert not thread.is_alive()
    files = sorted((run_dir / "logs").iterdir())
    assert [f.name for f in files] == ["chatty.log", "chatty.log.1", "chatty.log.2"]
    assert all(f.stat().st_size <= limit + 40 for f in files), [f.stat().st_size for f in files]
    kept = _lines([files[2], files[1], files[0]])  # oldest first
    numbers = [int(ln.split()[1]) for ln in kept]
    # consecutive, the oldest dropped
    assert numbers == list(range(numbers[0], LINES)) and numbers[0] > 0


def test_scrape_snapshots_rotate(tmp_path):
    metrics = Metrics()
    metrics.gauge("buffer/filler", "a series with a long name " * 4).set(1.0)
    server = MetricsServer(metrics, 0, "127.0.0.1")
    try:
        run = tmp_path / "run"
        (run / "metrics").mkdir(parents=True)
        cfg = RunConfig(run_dir=str(run))
        cfg = dataclasses.replace(cfg, launch=dataclasses.replace(cfg.launch, log_max_mb=2 / 1024,
                                                                  log_backups=1))
        topo = Topology(host="127.0.0.1", buffer_address="", pub_address="", master_port=0,
                        rollout_cpus=None,
                        trainer_cpus=None, slots=(DaemonSlot(name="buffer", kind="buffer",
                                                            metrics_port=server.port, cpus=None),))
        mon = Monitor(cfg, topo, run, out=io.StringIO())
        for _ in range(60):
            mon.scrape()
        mon.close()
    finally:
        server.stop()
    files = sorted((run / "metrics").iterdir())
    assert [f.name for f in files] == ["scrape.jsonl", "scrape.jsonl.1"]
    assert all(0 < f.stat().st_size <= 2048 + 400 for f in files), [f.stat().st_size for f in files]
    last = json.loads(files[0].read_text().splitlines()[-1])
    assert last["daemon"] == "buffer" and last["values"]["areal_buffer_filler"] == 1.0
