"""The supervisor leaves no process behind (launch/local.py, "Invariants"): a child that stays in
the process group of a daemon that exited is killed when that exit is noticed, not forgotten once
the daemon is restarted; and a group whose leader exited long ago is never signalled by its
number, which another process may lead by then."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import psutil
import pytest

from launch.local import ProcSpec, Supervisor

# waits for one byte on fd GO, then forks a child that stays in its group (it writes its PID to
# fd PIDS) and exits 3 at once: no poll of the supervisor sees the child
LEAVES_A_CHILD = """
import os, sys, time
go, pids = int(sys.argv[1]), int(sys.argv[2])
os.read(go, 1)
if os.fork() == 0:
    os.write(pids, b"%d\\n" % os.getpid())
    time.sleep(300)
    os._exit(0)
os._exit(3)
"""


def test_a_child_left_in_an_exited_daemons_group_is_killed_before_its_restart(tmp_path):
    go_r, go_w = os.pipe()
    pids_r, pids_w = os.pipe()
    argv = [sys.executable, "-c", LEAVES_A_CHILD, str(go_r), str(pids_w)]
    told = []

    def on_tick(sup: Supervisor) -> None:
        p = sup.proc("d")
        if not told:
            told.append(os.write(go_w, b"x"))  # once: the first run reads it, leaves its child
        elif p.restarts == 1 and p.restart_at is None:
            sup.request_stop()  # restarted (blocked on GO): the old group is history

    sup = Supervisor([ProcSpec(name="d", argv=argv)], tmp_path, restarts=1,
                     restart_backoff_s=0.01, stop_grace_s=5.0, echo=lambda _line: None,
                     on_tick=on_tick, inherit_fds=(go_r, pids_w))
    child = None
    try:
        sup.run()
        os.close(pids_w)
        pids_w = -1
        child = int(os.read(pids_r, 64).split()[0])
        assert not psutil.pid_exists(child) or \
            psutil.Process(child).status() == psutil.STATUS_ZOMBIE, \
            "the first run's child outlived the job"
    finally:
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        for fd in (go_r, go_w, pids_r, pids_w):
            if fd >= 0:
                os.close(fd)


def test_stopping_a_daemon_that_exited_long_ago_signals_no_group_by_its_old_number(tmp_path):
    # another session's leader now has the PID (and so the group id) the daemon had
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                                start_new_session=True)
    try:
        sup = Supervisor([ProcSpec(name="d", argv=["true"])], tmp_path, echo=lambda _line: None)
        exited = subprocess.Popen(["true"])
        exited.wait()
        exited.pid = stranger.pid  # as if the kernel had recycled the number
        sup.proc("d").popen = exited
        sup.stop_all()
        with pytest.raises(subprocess.TimeoutExpired):  # a signal sent is seen within the second
            stranger.wait(timeout=1.0)
    finally:
        stranger.kill()
        stranger.wait()
