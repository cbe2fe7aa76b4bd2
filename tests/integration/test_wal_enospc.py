"""A real full disk: the buffer in ``unshare -Urm`` on a small tmpfs filled from outside.

It stays up refusing groups as unavailable/disk_full (no traceback), accepts again once the filler
goes, and stores every acked group once (checked from a copy of its WAL). Skipped without user
namespaces.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_buffer_crash import stored_groups
from test_wal_disk_full import REQUEST_S, Log, Producer, write_config

from tests.conftest import child_env

TMPFS_BYTES = 8 << 20  # the WAL's whole filesystem
RESERVE_BYTES = 1 << 20  # buffer.wal_reserve_bytes: group records stop this far before full
GROUPS_BEFORE = 20

# Runs inside the namespace: mount the tmpfs on the WAL directory, run the buffer, then keep the
# namespace (and so the tmpfs) alive until the test has copied the WAL out.
IN_NAMESPACE = """
import signal, subprocess, sys, time
from pathlib import Path
wal, size, config, marks = sys.argv[1:5]
subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", wal], check=True)
buffer = subprocess.Popen([sys.executable, "-m", "buffer", "--config-file", config])
signal.signal(signal.SIGTERM, lambda *_: (buffer.kill(), sys.exit(1)))
Path(marks, "buffer.pid").write_text(str(buffer.pid))
Path(marks, "buffer.rc").write_text(str(buffer.wait()))
deadline = time.monotonic() + 600
while not Path(marks, "release").exists() and time.monotonic() < deadline:
    time.sleep(0.05)
"""


def user_namespaces() -> str | None:
    """None when this user may mount a tmpfs in a namespace of its own, else why not."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "no unshare or mount program"
    out = subprocess.run(["unshare", "-Urm", "mount", "-t", "tmpfs", "tmpfs", "/mnt"],
                         capture_output=True, text=True, timeout=30)
    return None if out.returncode == 0 else f"unshare -Urm: {out.stderr.strip()}"


def fill(path: Path) -> int:
    """Write zeros to ``path`` until its filesystem has no byte left; the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1):  # then the last pages, then the last page's bytes
            try:
                while True:
                    written += f.write(bytes(size))
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
    return written


def test_a_disk_that_fills_mid_run_refuses_groups_then_recovers_and_loses_none(
        tmp_run_dir, spawn_python, wait_until):
    why = user_namespaces()
    if why:
        pytest.skip(f"needs an unprivileged user+mount namespace for a small tmpfs: {why}")
    wal = tmp_run_dir / "wal"
    wal.mkdir()
    cfg, config_file = write_config(tmp_run_dir, wal_dir=str(wal),
                                    wal_reserve_bytes=RESERVE_BYTES)
    ns = subprocess.Popen(["unshare", "-Urm", sys.executable, "-c", IN_NAMESPACE, wal,
                           str(TMPFS_BYTES), config_file, tmp_run_dir], stderr=subprocess.PIPE,
                          text=True, env=child_env())
    spawn_python.procs.append(ns)  # stopped at teardown with whatever it started
    log = Log(ns.stderr)
    log.start()
    pid_file, rc_file = tmp_run_dir / "buffer.pid", tmp_run_dir / "buffer.rc"
    wait_until(pid_file.exists, 60, 0.05, "the buffer in its namespace")
    inside = Path(f"/proc/{ns.pid}/root") / wal.relative_to("/")  # the tmpfs, seen from here
    producer = Producer(cfg.buffer.address)
    try:
        producer.until(lambda: len(producer.acked) >= GROUPS_BEFORE, "groups before it fills")
        producer.stock()  # credits in hand: a degraded buffer grants none
        filled = fill(inside / "filler")
        assert os.statvfs(inside).f_bavail == 0, "the tmpfs is not full"
        producer.until(lambda: producer.refusals, "a group refused for the full disk")
        assert all(r.startswith("disk_full") for r in producer.refusals), producer.refusals
        assert ns.poll() is None and not rc_file.exists(), "\n".join(log.lines[-30:])
        acked_when_full = len(producer.acked)

        (inside / "filler").unlink()
        producer.refusals.clear()
        producer.until(lambda: len(producer.acked) >= acked_when_full + GROUPS_BEFORE,
                       "groups accepted once space is back")
    except BaseException:
        print("\n".join(log.lines[-60:]))
        raise
    finally:
        producer.close()
    os.kill(int(pid_file.read_text()), signal.SIGTERM)  # a clean stop: the WAL is complete
    wait_until(rc_file.exists, 60, 0.1, "the buffer to stop")
    assert rc_file.read_text() == "0", "\n".join(log.lines[-30:])
    for f in inside.iterdir():  # out of the tmpfs, which goes with the namespace
        shutil.copy2(f, wal / f.name)
    (tmp_run_dir / "release").touch()
    ns.wait(timeout=60)
    log.join(timeout=30)
    assert not any("Traceback" in line for line in log.lines), "\n".join(log.lines[-40:])
    assert any("degraded" in line for line in log.lines), "\n".join(log.lines[-40:])
    print(f"filled {filled} bytes; {acked_when_full} groups acked before the disk was full, "
          f"{len(producer.acked)} in all")

    spawn_python("buffer", ["--config-file", config_file], capture=False)
    delivered = [g.group_id for g in stored_groups(cfg.buffer.address, REQUEST_S)]
    assert sorted(delivered) == sorted(set(producer.acked)), "an acked group lost, or stored twice"
