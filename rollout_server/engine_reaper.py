"""What a launched SGLang leaves behind, and the reaper that removes it even after a ``kill -9``.

``shm_files(pgid)`` lists the ``/dev/shm`` files the processes of SGLang's group map or hold open
(which ones and how they are found: rollout_server/ROLLOUT.md, "A launched SGLang that dies").

Invariants:
* only processes in the group are read, each checked to be in it after its maps and fds are read
  (a PID reused meanwhile counts for nothing), so no other process's file is ever reaped;
* one reaper per engine (``python -m rollout_server.engine_reaper PGID TMPDIR``), in a session of
  its own and NOT tied to the rollout server, reads paths from stdin until end of file (the
  server's ``stop()`` or death), then SIGKILLs what is left of the group, waits until it is gone
  (``GONE_TIMEOUT_S``), unlinks the files it was told and removes the engine's own TMPDIR (its
  IPC sockets; SGLang leaves them even on a clean stop).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path

SHM = "/dev/shm/"
SEM = SHM + "sem."  # a POSIX named semaphore (glibc: /dev/shm/sem.NAME)
DELETED = " (deleted)"  # how /proc/PID/maps and fd links show a file unlinked since
GONE_TIMEOUT_S = 30.0  # SIGKILL is immediate; the slack: a loaded machine reaping a large tree
POLL_S = 0.05


def group_of(pid: int) -> int | None:
    """The process group of live process ``pid`` (from /proc/PID/stat); None once it is gone or a
    zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
    return None if fields[0] == "Z" else int(fields[2])


def group_members(pgid: int) -> list[int]:
    """PIDs of live processes in process group ``pgid`` (from /proc; zombies excluded)."""
    return [int(e.name) for e in Path("/proc").iterdir()
            if e.name.isdigit() and group_of(int(e.name)) == pgid]


def shm_files(pgid: int) -> set[str]:
    """The /dev/shm files the processes of group ``pgid`` have mapped or open, with the named
    semaphores they map under a name unlinked since (module docstring: only the group's own)."""
    files: set[str] = set()
    unlinked: set[tuple[int, int]] = set()  # (device, inode) of "/dev/shm/sem.* (deleted)" maps
    for pid in group_members(pgid):
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
            fds = [link for fd in os.listdir(f"/proc/{pid}/fd") if (link := _link(pid, fd))]
        except OSError:  # it exited meanwhile
            continue
        if group_of(pid) != pgid:  # gone, or the PID is another process's by now
            continue
        paths = []
        for line in maps.splitlines():  # range perms offset major:minor inode path
            if len(cols := line.split(None, 5)) == 6:
                paths.append(cols[5])
                if cols[5].startswith(SEM) and cols[5].endswith(DELETED):
                    major, minor = (int(x, 16) for x in cols[3].split(":"))
                    unlinked.add((os.makedev(major, minor), int(cols[4])))
        # an unlinked file shows as "... (deleted)": its name may be another's by now
        found = [*paths, *fds]
        files.update(p for p in found if p.startswith(SHM) and not p.endswith(DELETED))
    return files | semaphores(unlinked)


def _link(pid: int, fd: str) -> str:
    """Where fd ``fd`` of ``pid`` points; "" once it is closed."""
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return ""


def semaphores(files: set[tuple[int, int]]) -> set[str]:
    """The ``/dev/shm/sem.*`` names of ``files`` (device, inode)."""
    if not files:
        return set()
    found = set()
    for entry in os.scandir(SHM):
        try:
            if entry.name.startswith("sem.") and \
                    ((st := entry.stat(follow_symlinks=False)).st_dev, st.st_ino) in files:
                found.add(entry.path)
        except FileNotFoundError:  # unlinked meanwhile
            continue
    return found


def reap(pgid: int, files: list[str], timeout_s: float = GONE_TIMEOUT_S,
         tmpdir: str | None = None) -> bool:
    """Kill what is left of group ``pgid``, wait until it is gone, unlink ``files`` and remove
    ``tmpdir``. True when the group went within ``timeout_s`` (the files are removed either way:
    nothing will use them)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while (left := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    for f in files:
        Path(f).unlink(missing_ok=True)
    if tmpdir:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return not left


def main() -> int:
    pgid, tmpdir = int(sys.argv[1]), sys.argv[2]
    files = [line.strip() for line in sys.stdin if line.strip().startswith(SHM)]  # until EOF
    return 0 if reap(pgid, files, tmpdir=tmpdir) else 1


if __name__ == "__main__":
    sys.exit(main())
