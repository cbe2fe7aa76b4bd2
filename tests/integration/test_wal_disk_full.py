"""A WAL segment that cannot grow (RLIMIT_FSIZE: EFBIG with statvfs showing room): the buffer
stops by itself (exit 1) having acked nothing unwritten, one error line naming segment and errno,
no traceback; restarted, it holds every acked group exactly once.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_buffer_crash import stored_groups

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
from areal_like.wire.trajectory import Trajectory, as_f32, as_i32

FILE_LIMIT = 256 * 1024  # bytes a WAL segment may reach: some hundred groups
REQUEST_S = 30.0  # a live buffer answers in milliseconds, on a loaded machine too
RESEND_S = 2.0  # a group not acknowledged by then goes to the back of the sender's line
HEARTBEAT_S = 0.5
PHASE_S = 120.0  # bound on each phase of a test_wal_enospc run; never a timing assert
EXIT_S = 60.0  # how long the daemon may take to stop by itself
STREAM_S = 120.0  # how long the producer streams at most
MAX_GROUPS = 2_000  # far more than fit under the limit

LIMITED = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
sys.argv = ["buffer", *sys.argv[1:]]
runpy.run_module("buffer", run_name="__main__", alter_sys=True)
"""


def group_for(credit: P.Credit) -> P.TrajectoryGroup:
    trajs = [Trajectory.of(prompt_ids=as_i32([1, 2]), output_ids=as_i32(np.arange(200) % 50),
                           behav_logp=as_f32(np.full(200, -0.5)), versions=as_i32(np.zeros(200)),
                           reward=float(i), finish_reason="stop") for i in range(2)]
    return P.TrajectoryGroup(group_id=f"g-{credit.lease_id}", server_id="prod",
                             lease_id=credit.lease_id, prompt_index=credit.prompt_index,
                             epoch=credit.epoch, trajectories=trajs)


class Log(threading.Thread):
    """Collects a process's stderr lines."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream, self.lines = stream, []

    def run(self) -> None:
        for line in self.stream:
            self.lines.append(line.rstrip("\n"))


def write_config(run_dir, **buffer_kw) -> tuple[RunConfig, Path]:
    """A plain-socket run config for one producer's stream, written to run_dir/config.yaml."""
    cfg = RunConfig(run_dir=str(run_dir), security=SecurityConfig(curve=False),
                    task=TaskConfig(num_prompts=100_000), model=ModelConfig(vocab_size=1024),
                    buffer=BufferConfig(address=f"tcp://127.0.0.1:{free_port()}",
                                        pub_address=f"tcp://127.0.0.1:{free_port()}",
                                        max_staleness=10_000, groups_per_step=1, capacity=10_000,
                                        **buffer_kw))
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return cfg, run_dir / "config.yaml"


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


@pytest.mark.parametrize("fsync", ["always", "batch"])  # written by the fsync thread, or inline
def test_a_wal_that_cannot_grow_stops_the_buffer_cleanly_and_loses_no_acked_group(
        fsync, tmp_run_dir, spawn_python, wait_until):
    cfg, config_file = write_config(tmp_run_dir, fsync=fsync)
    buffer = spawn_python(LIMITED.format(limit=FILE_LIMIT), ["--config-file", config_file])
    log = Log(buffer.stderr)
    log.start()
    producer = Producer(cfg.buffer.address)
    deadline = time.monotonic() + STREAM_S  # a bound on the whole stream, never a timing assert
    try:
        while (buffer.poll() is None and time.monotonic() < deadline
               and len(producer.acked) < MAX_GROUPS):
            producer.send_one()  # a group not acknowledged is sent again while the daemon lives
    except TransportTimeout:
        pass  # the daemon stopped during a request
    finally:
        producer.close()
    wait_until(lambda: buffer.poll() is not None, EXIT_S, 0.1, "the buffer to stop")
    acked = producer.acked
    assert producer.refusals == [], producer.refusals
    log.join(timeout=30)  # the daemon's stderr is closed: every line is in
    assert buffer.returncode == 1, "\n".join(log.lines[-30:])
    assert len(acked) > 10, acked  # it stored groups before the limit

    wal_dir = cfg.resolve_path(cfg.buffer.wal_dir)
    errors = [line for line in log.lines if " ERROR " in line]
    assert len(errors) == 1, "\n".join(log.lines[-30:])
    assert f"{wal_dir}/seg-" in errors[0] and "(EFBIG)" in errors[0], errors
    assert not any("Traceback" in line for line in log.lines), "\n".join(log.lines[-40:])

    spawn_python("buffer", ["--config-file", config_file], capture=False)  # no limit: room again
    delivered = [g.group_id for g in stored_groups(cfg.buffer.address, REQUEST_S)]
    assert sorted(delivered) == sorted(set(acked)), "an acked group lost (or one stored twice)"
