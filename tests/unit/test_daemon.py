"""Daemon lifecycle: graceful SIGTERM/SIGINT, a failure a part of the daemon records takes the
daemon down with a log line naming it, and /metrics + /health served from the daemon's own
registry."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from areal_like.daemon import Daemon

STARTUP_TIMEOUT_S = 60.0  # a cold interpreter importing prometheus/zmq on a loaded 2-core box
EXIT_TIMEOUT_S = 30.0

# The child: a tiny daemon whose behaviour is picked by argv[1]; argv[2] is a flag file that
# makes health() report not-ok while it exists.
CHILD = """
import os, sys, time
from areal_like.daemon import Daemon

class Probe(Daemon):
    name = "probe"

    def start(self):
        self.metrics.counter("probe/ticks", "loop iterations")
        self.metrics.gauge("probe/mode_crash").set(1 if sys.argv[1] == "crash" else 0)
        self.crash_at = time.monotonic() + 0.5 if sys.argv[1] == "crash" else None
        print("PORT", self.metrics_server.port, flush=True)

    def run_once(self):
        self.metrics.counter("probe/ticks").inc()
        if self.crash_at is not None and time.monotonic() >= self.crash_at:
            self.failure = self.failure or RuntimeError("boom in a component")
        time.sleep(0.02)

    def health(self):
        ok, details = super().health()
        return ok and not os.path.exists(sys.argv[2]), details

    def stop(self):
        print("STOP_RAN", flush=True)

sys.exit(Probe(metrics_port=0).serve())
"""


def read_line_starting(proc, prefix: str, timeout_s: float = STARTUP_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if line.startswith(prefix):
                return line.strip()
            if not line and proc.poll() is not None:
                break
    raise AssertionError(f"no line starting {prefix!r}; exit={proc.poll()} "
                         f"stderr={proc.stderr.read()[-2000:]}")


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def start_probe(spawn_python, tmp_path, mode: str):
    flag = tmp_path / "unhealthy"
    proc = spawn_python(CHILD, [mode, flag])
    port = int(read_line_starting(proc, "PORT").split()[1])
    return proc, port, flag


def stops_gracefully(proc, sig: int) -> None:
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=EXIT_TIMEOUT_S)
    assert proc.returncode == 0, err
    assert "STOP_RAN" in out
    # structured log lines tagged with the name
    assert "[probe pid=" in err and "stopped (exit 0)" in err


def test_sigint_stops_gracefully(spawn_python, tmp_path):
    stops_gracefully(start_probe(spawn_python, tmp_path, "ok")[0], signal.SIGINT)


def test_a_recorded_failure_takes_the_daemon_down(spawn_python, tmp_path):
    proc, _, _ = start_probe(spawn_python, tmp_path, "crash")
    out, err = proc.communicate(timeout=EXIT_TIMEOUT_S)
    assert proc.returncode != 0
    assert "STOP_RAN" in out  # stop() still runs
    assert "probe: RuntimeError: boom in a component" in err


def test_metrics_and_health_endpoints_then_sigterm_stops_gracefully(spawn_python, tmp_path,
                                                                     wait_until):
    proc, port, flag = start_probe(spawn_python, tmp_path, "ok")
    base = f"http://127.0.0.1:{port}"

    def ticks() -> float:
        status, text = http_get(base + "/metrics")
        assert status == 200
        lines = [ln for ln in text.splitlines() if ln.startswith("areal_probe_ticks_total ")]
        return float(lines[0].split()[1]) if lines else 0.0

    status, text = http_get(base + "/metrics")
    assert (status == 200 and "# TYPE areal_probe_ticks_total counter" in text
            and "areal_probe_mode_crash 0.0" in text)
    wait_until(lambda: ticks() >= 3, 30, what="the counter to advance")
    status, body = http_get(base + "/health")
    assert status == 200 and json.loads(body)["ok"] is True and json.loads(body)["name"] == "probe"
    flag.write_text("x")
    status, body = http_get(base + "/health")
    # not ready is not failed: no "error" (areal-like status says starting)
    assert status == 503 and json.loads(body)["ok"] is False and "error" not in json.loads(body)
    assert http_get(base + "/nope")[0] == 404
    stops_gracefully(proc, signal.SIGTERM)


# ---------------------------------------------------------------- in-process lifecycle


class Counting(Daemon):
    name = "counting"

    def __init__(self, iterations: int, fail_at: int | None = None):
        super().__init__(metrics_port=-1)  # no HTTP server needed here
        self.iterations, self.fail_at, self.calls, self.stopped = iterations, fail_at, 0, False

    def run_once(self):
        self.calls += 1
        if self.calls == self.fail_at:
            raise ValueError("bad iteration")
        if self.calls >= self.iterations:
            self.request_stop()

    def stop(self):
        self.stopped = True


@pytest.mark.parametrize("fail_at,code,calls", [(None, 0, 5), (3, 1, 3)], ids=["stop", "crash"])
def test_serve_runs_until_stopped_or_crashed_then_stops_and_restores_signals(fail_at, code, calls):
    before = signal.getsignal(signal.SIGTERM)
    d = Counting(iterations=5, fail_at=fail_at)
    assert d.serve() == code and d.calls == calls and d.stopped
    assert signal.getsignal(signal.SIGTERM) is before


def test_exit_process_flushes_logs_and_output_and_keeps_the_code():
    code = ("import logging, sys\n"
            "from areal_like.daemon import exit_process, setup_logging\n"
            "setup_logging('t').warning('last log line')\n"
            "sys.stdout.write('no newline, still written')\n"
            "exit_process(3)\n"
            "print('never')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3
    assert r.stdout == "no newline, still written" and "last log line" in r.stderr


def test_health_names_the_kind_of_a_recorded_failure_only_and_while_the_daemon_stops():
    """A crash in run() (or start()): while stop() runs (an engine stopping can take seconds)
    /health names it, so `areal-like status` says DOWN rather than starting."""
    class Stopping(Counting):
        def stop(self):
            self.seen = self.health()

    d = Stopping(iterations=5, fail_at=2)
    assert d.health() == (True, {"name": "counting"})
    assert d.serve() == 1
    assert d.seen == (False, {"name": "counting", "error": "ValueError"})
    d.failure = RuntimeError("/secret/path: boom")
    assert d.health() == (False, {"name": "counting", "error": "RuntimeError"})


def test_a_metrics_port_another_process_holds_refuses_the_start_naming_the_key(caplog):
    """It crashed the daemon with a traceback (exit 1: the supervisor restarted it, to the same
    failure); a fixed port taken is a setting this machine cannot serve: one line, exit 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        d = Counting(iterations=1)
        d.metrics_port = taken.getsockname()[1]
        assert d.serve() == 2 and d.calls == 0
    assert f"counting.metrics_port={d.metrics_port}: cannot listen on 127.0.0.1" in caplog.text
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("value,shown", [("debug", "x: hi"), ("loud", "is not a logging level")])
def test_a_log_level_in_lower_case_or_misspelt_does_not_crash_the_daemon(value, shown):
    """``AREAL_LIKE_LOG_LEVEL=debug`` (or a typo) raised ValueError in every daemon's first line."""
    code = "from areal_like.daemon import setup_logging\nsetup_logging('x').debug('hi')\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "AREAL_LIKE_LOG_LEVEL": value})
    assert out.returncode == 0 and shown in out.stderr and "Traceback" not in out.stderr
