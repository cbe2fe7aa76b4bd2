"""``areal-like status`` / ``top`` as a new user meets them: a job starting up (a daemon that
answers "not ready", one not started yet, the warm start before any ports.json), a finished job,
and which run directory they pick when none is named."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from areal_like.net.distributed import free_port
from areal_like.net.metrics import Metrics, MetricsServer
from launch.top import status


def _ports(run_dir, daemons: list[tuple[str, int, int | None]], **extra) -> None:
    (run_dir / "ports.json").write_text(json.dumps({**extra, "daemons": [
        {"name": n, "kind": n.split("-")[0], "pid": pid,
         "metrics_url": f"http://127.0.0.1:{p}/metrics",
         "health_url": f"http://127.0.0.1:{p}/health"} for n, p, pid in daemons]}))


def _states(out: str) -> dict[str, str]:
    return {ln.split()[0]: ln.split()[1] for ln in out.splitlines() if ln.strip()}


def _dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def test_status_says_starting_for_a_daemon_whose_health_says_not_ready(tmp_path, capsys):
    """A rollout server loading its engine answers /health 503 with its uptime: starting, not DOWN.
    A probe that raised (its answer names an error) stays DOWN."""

    def broken():
        raise RuntimeError("probe broke")

    loading = MetricsServer(Metrics(), 0, "127.0.0.1", health=lambda: (False, {"name": "r"}))
    failing = MetricsServer(Metrics(), 0, "127.0.0.1", health=broken)
    try:
        _ports(tmp_path, [("rollout-0", loading.port, os.getpid()),
                          ("rollout-1", failing.port, os.getpid())])
        assert status(tmp_path) == 1  # not every daemon is up
        out = capsys.readouterr().out
        assert _states(out) == {"rollout-0": "starting", "rollout-1": "DOWN"}, out
        assert "uptime" in out.splitlines()[0], out
    finally:
        loading.stop()
        failing.stop()


def test_status_says_starting_for_a_daemon_the_live_launcher_has_not_started(tmp_path, capsys):
    """ports.json lists a daemon of a later start stage with no PID yet (a trainer waiting for the
    engines on a shared GPU): starting while the launcher lives, DOWN once it is gone."""
    _ports(tmp_path, [("trainer", free_port(), None)], supervisor_pid=os.getpid())
    assert status(tmp_path) == 1
    out = capsys.readouterr().out
    assert _states(out) == {"trainer": "starting"} and "not started yet" in out, out
    _ports(tmp_path, [("trainer", free_port(), None)], supervisor_pid=_dead_pid())
    assert status(tmp_path) == 1
    assert _states(capsys.readouterr().out) == {"trainer": "DOWN"}


def test_status_of_a_finished_run_shows_no_connection_errors(tmp_path, capsys):
    """The daemons of a finished job are gone as they should be: `finished`, without the refused
    connection's error text, which read like a failure; the exit code stays 1 (not all up)."""
    _ports(tmp_path, [("buffer", free_port(), _dead_pid()), ("rollout-0", free_port(), None)])
    (tmp_path / "summary.json").write_text("{}")
    later = os.stat(tmp_path / "ports.json").st_mtime + 1
    os.utime(tmp_path / "summary.json", (later, later))
    assert status(tmp_path) == 1
    out = capsys.readouterr().out
    assert _states(out) == {"buffer": "finished", "rollout-0": "finished"}, out
    assert "Error" not in out and "refused" not in out, out
