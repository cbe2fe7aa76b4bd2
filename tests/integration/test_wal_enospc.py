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
import time
from pathlib import Path

import pytest
from test_buffer_crash import stored_groups
from test_wal_disk_full import Log, group_for

from areal_like.net.dealer import Client
from areal_like.net.distributed import free_port
from areal_like.net.transport import TransportTimeout
from areal_like.settings.config import (
    BufferConfig,
    ModelConfig,
    RunConfig,
    SecurityConfig,
    TaskConfig,
    to_yaml,
)
from areal_like.wire import protocol as P
from tests.conftest import child_env

TMPFS_BYTES = 8 << 20  # the WAL's whole filesystem
RESERVE_BYTES = 1 << 20  # buffer.wal_reserve_bytes: group records stop this far before full
REQUEST_S = 30.0  # a live buffer answers in milliseconds, on a loaded machine too
PHASE_S = 120.0  # bound on each phase (before, full, after); never a timing assert
RESEND_S = 2.0  # a group not acknowledged by then goes to the back of the sender's line
HEARTBEAT_S = 0.5
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


class Producer:
    """A rollout server's part: credits, groups resent until acked (RESEND_S), heartbeats."""

    def __init__(self, address: str):
        self.client = Client(address, timeout_s=REQUEST_S)
        self.beats = Client(address, timeout_s=HEARTBEAT_S)
        self.acked: list[str] = []
        self.refusals: list[str] = []
        self.credits: list[P.Credit] = []
        self.next_beat = 0.0
        ack = self.client.request(P.Register(server_id="prod", engine_url="http://x",
                                             policy_version=0))
        assert isinstance(ack, P.RegisterAck), ack

    def stock(self) -> None:
        if not self.credits:
            got = self.client.request(P.CreditRequest(server_id="prod", max_credits=8))
            self.credits = list(got.credits)

    def beat(self) -> None:
        if time.monotonic() >= self.next_beat:  # a reply may wait for the disk; arriving counts
            self.next_beat = time.monotonic() + 1.0
            try:
                self.beats.request(P.Heartbeat(server_id="prod", policy_version=0))
            except TransportTimeout:
                pass

    def send_one(self) -> None:
        self.beat()
        if not self.credits:
            self.stock()
            if not self.credits:
                time.sleep(0.05)
                return
        try:
            ack = self.client.request(group_for(self.credits[0]), timeout_s=RESEND_S)
        except TransportTimeout:  # its record may wait for space: sent again later
            self.credits.append(self.credits.pop(0))
            return
        if ack.status in ("accepted", "duplicate"):
            self.acked.append(ack.ref)
            self.credits.pop(0)
        else:
            assert ack.status == "unavailable", ack  # kept and sent again, as a rollout server does
            self.refusals.append(ack.reason)
            time.sleep(0.05)

    def until(self, done, what: str) -> None:
        deadline = time.monotonic() + PHASE_S
        while not done():
            assert time.monotonic() < deadline, (
                f"timed out waiting for {what}: {len(self.acked)} acked, {len(self.credits)} "
                f"credits held, refusals {self.refusals[:3]}")
            self.send_one()

    def close(self) -> None:
        self.client.close()
        self.beats.close()


def test_a_disk_that_fills_mid_run_refuses_groups_then_recovers_and_loses_none(
        tmp_run_dir, spawn_python, wait_until):
    why = user_namespaces()
    if why:
        pytest.skip(f"needs an unprivileged user+mount namespace for a small tmpfs: {why}")
    wal = tmp_run_dir / "wal"
    wal.mkdir()
    cfg = RunConfig(run_dir=str(tmp_run_dir), security=SecurityConfig(curve=False),
                    task=TaskConfig(num_prompts=100_000), model=ModelConfig(vocab_size=1024),
                    buffer=BufferConfig(address=f"tcp://127.0.0.1:{free_port()}",
                                        pub_address=f"tcp://127.0.0.1:{free_port()}",
                                        max_staleness=10_000, groups_per_step=1, capacity=10_000,
                                        wal_dir=str(wal), wal_reserve_bytes=RESERVE_BYTES))
    config_file = tmp_run_dir / "config.yaml"
    config_file.write_text(to_yaml(cfg))
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
