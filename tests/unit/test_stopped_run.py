"""A test run stopped with SIGTERM (a CI timeout, ``kill PID``) still stops what its tests started:
tests/conftest.py turns the signal into the interrupt Ctrl-C gives, so every teardown runs."""

from __future__ import annotations

import signal

import psutil

from tests.conftest import REPO_ROOT, wait_until

HOLDING = """
import os, time
from pathlib import Path

def test_holds_a_process(spawn_python):
    proc = spawn_python("import time; time.sleep(600)")
    Path(os.environ["PID_FILE"]).write_text(str(proc.pid))
    time.sleep(600)
"""


def test_a_run_stopped_by_sigterm_stops_the_processes_its_test_started(tmp_path, spawn_python):
    (tmp_path / "test_holding.py").write_text(HOLDING)
    pid_file = tmp_path / "pid"
    run = spawn_python("pytest", ["-q", "-p", "no:xdist", "-p", "tests.conftest",
                                  tmp_path / "test_holding.py"],
                       env={"PID_FILE": str(pid_file)}, cwd=REPO_ROOT)
    held = int(wait_until(lambda: pid_file.exists() and pid_file.read_text(), 60, 0.1,
                          "the inner test's process"))
    try:
        run.send_signal(signal.SIGTERM)
        out, _ = run.communicate(timeout=60)
        assert run.returncode == 2 and "stopped by signal 15" in out, out  # pytest's "interrupted"
        assert not psutil.pid_exists(held), out
    finally:
        if psutil.pid_exists(held):  # a failed check's orphan: spawn_python stops only the run
            psutil.Process(held).kill()
