"""A rollout server killed with SIGKILL leaves no engine process behind, nor its port.

SGLang needs a GPU, so the child tied with ``spawn_tied`` (rollout_server/engine_process.py) is the
embedded engine's HTTP server; the control case shows the test would fail without the tie.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from areal_like.net.distributed import free_port
from rollout_server.engine_process import healthy
from tests.conftest import port_free

REPO = Path(__file__).resolve().parents[2]
GONE_DEADLINE_S = 30.0  # SIGKILL delivery is immediate; the slack is for a loaded CI machine
HEALTH_DEADLINE_S = 180.0

PARENT = r"""
import subprocess, sys, threading
sys.path.insert(0, sys.argv[1])
from rollout_server.engine_process import spawn_tied
argv = [sys.executable, *sys.argv[3:]]
if sys.argv[2] == "tied":
    child = spawn_tied(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
else:
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
print(f"CHILD {child.pid}", flush=True)
threading.Event().wait()
"""


def _start_parent(mode: str, *child_argv: str) -> tuple[subprocess.Popen, psutil.Process]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(REPO), mode, *child_argv],
                              stdout=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    line = parent.stdout.readline()
    assert line.startswith("CHILD "), (
        f"stand-in rollout server printed {line!r} (exit {parent.poll()})")
    return parent, psutil.Process(int(line.split()[1]))


def _kill(*procs) -> None:
    for p in procs:
        try:
            p.kill()
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass


def test_engine_and_its_port_go_when_the_rollout_server_is_killed_and_an_untied_child_stays():
    port = free_port()
    parent, child = _start_parent("tied", "-m", "rollout_server.engine", "--host", "127.0.0.1",
                                  "--port", str(port))
    # the control: without the tie the child outlives its parent, so the test would fail
    plain, untied = _start_parent("plain", "-c", "import threading; threading.Event().wait()")
    try:
        deadline = time.monotonic() + HEALTH_DEADLINE_S
        while (time.monotonic() < deadline and child.is_running()
                and not healthy(f"http://127.0.0.1:{port}")):
            psutil.wait_procs([child], timeout=0.5)  # returns early if the engine died
        assert child.is_running() and healthy(f"http://127.0.0.1:{port}"), (
            "the engine never came up")
        # a process group of its own
        assert os.getpgid(child.pid) == child.pid != os.getpgid(parent.pid)
        assert not port_free(port)
        for p in (parent, plain):
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
        gone, alive = psutil.wait_procs([child], timeout=GONE_DEADLINE_S)
        assert not alive, f"engine pid {child.pid} outlived its killed parent by {GONE_DEADLINE_S}s"
        assert port_free(port)
        assert untied.is_running()  # nothing else would have stopped it
    finally:
        _kill(parent, child, plain, untied)
        psutil.wait_procs([untied], timeout=10)
        parent.stdout.close()
        plain.stdout.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_a_child_whose_parent_is_already_gone_exits_at_once():
    """The race fork -> prctl: a child reparented before prctl exits instead of running untied."""
    from areal_like.daemon import TIED

    # PID 1 is not this process: the tie sees its parent gone and does not run the command
    code = subprocess.run([sys.executable, "-I", "-S", TIED, "1", str(int(signal.SIGKILL)),
                           sys.executable, "python", "-c", "print('untied')"],
                          capture_output=True, text=True, timeout=60)
    assert code.returncode == 1 and "untied" not in code.stdout
