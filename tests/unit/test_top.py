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


def _top(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """``areal-like top`` in a pipe (no terminal); TimeoutExpired if it does not exit."""
    return subprocess.run([sys.executable, "-m", "launch.cli", "top", *args],
                          capture_output=True, text=True, timeout=timeout)


def _finish(run_dir) -> None:
    """What ``areal-like run`` leaves when its job ends: summary.json, after ports.json."""
    (run_dir / "summary.json").write_text("{}")
    later = os.stat(run_dir / "ports.json").st_mtime + 1
    os.utime(run_dir / "summary.json", (later, later))


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
    _finish(tmp_path)
    assert status(tmp_path) == 1
    out = capsys.readouterr().out
    assert _states(out) == {"buffer": "finished", "rollout-0": "finished"}, out
    assert "Error" not in out and "refused" not in out, out


def test_top_on_a_finished_run_says_finished_and_exits(tmp_path):
    """Where status says finished, top did say DOWN for every daemon, printed on every 2 s forever
    without a terminal and exited 1 with --once: now one view saying finished, then exit 0."""
    _ports(tmp_path, [("buffer", free_port(), _dead_pid()), ("rollout-0", free_port(), None)])
    _finish(tmp_path)
    for args in ([], ["--once"]):
        done = _top(str(tmp_path), "--interval", "0.2", *args)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        assert "job finished" in done.stdout and "DOWN" not in done.stdout, done.stdout
        rows = [ln.split("│")[1:3] for ln in done.stdout.splitlines() if ln.startswith("│")]
        assert [[c.strip() for c in r] for r in rows] == [["buffer", "finished"],
                                                          ["rollout-0", "finished"]], done.stdout


def test_top_exits_with_a_last_view_when_the_job_it_watches_finishes(tmp_path):
    m = Metrics()
    m.gauge("buffer/trainer_version").set(7)
    srv = MetricsServer(m, 0, "127.0.0.1").start()
    try:
        _ports(tmp_path, [("buffer", srv.port, os.getpid())])
        watching = subprocess.Popen([sys.executable, "-m", "launch.cli", "top", str(tmp_path),
                                     "--interval", "0.2"], stdout=subprocess.PIPE, text=True)
        try:
            # the first view of the running job: the buffer answers
            assert "trainer step -" in watching.stdout.readline()
            _finish(tmp_path)
            rest, _ = watching.communicate(timeout=30)
        finally:
            watching.kill()
            watching.wait()
        assert watching.returncode == 0, rest
        last = rest[rest.rindex("trainer step -"):].splitlines()
        rows = [[c.strip() for c in ln.split("│")[1:3]] for ln in last if ln.startswith("│")]
        assert "job finished" in last[0] and rows == [["buffer", "finished"]], rest
    finally:
        srv.stop()
