"""What a launched SGLang leaves behind, and the reaper that removes it even after a ``kill -9``.

SGLang keeps files in ``/dev/shm`` while it runs: a 16 KB load snapshot
(``sglang_loads_<name>_<hash>.shm``, left behind even by a clean SIGTERM stop) and semaphores
(``sem.*``). Their names hold random parts, so they are found, not
predicted: ``shm_files(pgid)`` lists the ``/dev/shm`` files the processes of SGLang's group map or
hold open. Not covered: one named semaphore (``sem.mp-*``, 32 bytes) per SGLang run, which SGLang
creates and closes at start-up and leaves to Python's resource tracker to unlink; SGLang's own
shutdown SIGKILLs that tracker with its other children (also on a clean SIGTERM), and its random
name is known to nobody else, so it stays.

Killed processes remove nothing, and a rollout server killed with SIGKILL runs no cleanup. So
``SGLangProcess`` starts one reaper per engine, ``python -m rollout_server.engine_reaper PGID``,
in a session of its own and NOT tied to the rollout server: it reads file paths from its stdin,
one per line, until end of file, which comes when the rollout server closes the pipe (``stop()``)
or dies (the kernel closes it). Then it SIGKILLs what is left of the group, waits for the group
to be gone (``GONE_TIMEOUT_S``), unlinks the files it was told and exits. The port is the
kernel's: it is free once the group is gone.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

SHM = "/dev/shm/"
GONE_TIMEOUT_S = 30.0  # SIGKILL is immediate; the slack: a loaded machine reaping a large tree
POLL_S = 0.05


def group_members(pgid: int) -> list[int]:
    """PIDs of live processes in process group ``pgid`` (from /proc; zombies excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def shm_files(pgid: int) -> set[str]:
    """The /dev/shm files the processes of group ``pgid`` have mapped or open."""
    files: set[str] = set()
    for pid in group_members(pgid):
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
            fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:  # it exited meanwhile
            continue
        paths = [
            line.split(None, 5)[5] for line in maps.splitlines() if len(line.split(None, 5)) == 6
        ]
        # an unlinked file shows as "... (deleted)": its name may be another's by now
        found = [*paths, *fds]
        files.update(p for p in found if p.startswith(SHM) and not p.endswith(" (deleted)"))
    return files


def reap(pgid: int, files: list[str], timeout_s: float = GONE_TIMEOUT_S) -> bool:
    """Kill what is left of group ``pgid``, wait until it is gone, unlink ``files``. True when the
    group went within ``timeout_s`` (the files are unlinked either way: nothing will use them)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout_s
    while (left := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    for f in files:
        try:
            os.unlink(f)
        except FileNotFoundError:
            pass
    return not left


def main() -> int:
    pgid = int(sys.argv[1])
    files = [line.strip() for line in sys.stdin if line.strip().startswith(SHM)]  # until EOF
    return 0 if reap(pgid, files) else 1


if __name__ == "__main__":
    sys.exit(main())
