"""The engine reaper removes the named semaphore a killed process group (as SGLang's) left, and
nothing else (rollout_server/engine_reaper.py). Mutations checked: shm_files missing unlinked
semaphores, a closing fd, or a reused PID each failed a test here.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rollout_server import engine_reaper
from rollout_server.engine_process import stop_group
from rollout_server.engine_reaper import group_members, reap, shm_files

GROUP = r"""
import multiprocessing, sys
lock = multiprocessing.get_context("spawn").Lock()  # a named semaphore, as tqdm's in SGLang
print(lock._semlock.name, flush=True)
sys.stdin.read()  # until killed
"""


def _path(name: str) -> str:
    return "/dev/shm/sem." + name.lstrip("/")  # glibc's file for the semaphore "/NAME"


@pytest.fixture
def group():
    """A live process group holding a semaphore like SGLang's: (its leader's PID, the file)."""
    proc = subprocess.Popen([sys.executable, "-c", GROUP], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    path = _path(proc.stdout.readline().strip())
    try:
        yield proc.pid, path
    finally:
        with contextlib.suppress(ProcessLookupError):  # reaped by the test
            os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
        if os.path.exists(path):
            os.unlink(path)


def test_the_groups_semaphore_is_found_by_its_mapping_and_reaped_and_no_other(group):
    pgid, mine = group
    other = multiprocessing.get_context("spawn").Lock()  # another job's, alive meanwhile
    others = _path(other._semlock.name)
    assert os.path.exists(mine) and os.path.exists(others)
    maps = Path(f"/proc/{pgid}/maps").read_text()
    assert mine not in maps and "/dev/shm/sem." in maps  # mapped under another, unlinked name
    files = shm_files(pgid)
    assert mine in files and others not in files, files
    assert reap(pgid, sorted(files), timeout_s=30.0)  # SIGKILL: no finalizer, no tracker
    assert not group_members(pgid)
    assert not os.path.exists(mine) and os.path.exists(others)


def test_an_fd_closed_while_it_is_read_drops_that_fd_alone(group, monkeypatch):
    pgid, path = group
    readlink, closed = os.readlink, []

    def flaky(link: str) -> str:
        if link.startswith(f"/proc/{pgid}/fd/") and not closed:
            closed.append(link)
            raise FileNotFoundError(link)  # the fd closed between listdir and readlink
        return readlink(link)

    monkeypatch.setattr(engine_reaper.os, "readlink", flaky)
    assert path in shm_files(pgid) and closed


def test_a_pid_that_left_the_group_while_it_was_read_counts_for_nothing(group, monkeypatch):
    pgid, path = group
    group_of, looks = engine_reaper.group_of, []

    def reused(pid: int) -> int | None:
        looks.append(pid)
        first = looks.count(pid) == 1
        return group_of(pid) if first or pid != pgid else pgid + 1

    monkeypatch.setattr(engine_reaper, "group_of", reused)
    assert path not in shm_files(pgid) and looks.count(pgid) == 2


def test_stop_group_kills_a_member_that_outlived_an_exited_leader():
    leader = subprocess.Popen(["bash", "-c", "sleep 600 & echo $!"], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    member = int(leader.stdout.readline())
    try:
        assert leader.wait(timeout=30) == 0 and group_members(leader.pid) == [member]
        stop_group(leader, grace_s=0.0)
        deadline = time.monotonic() + 30
        while group_members(leader.pid) and time.monotonic() < deadline:
            time.sleep(0.01)  # SIGKILL is sent; the kernel ends it a moment later
        assert group_members(leader.pid) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, 9)
