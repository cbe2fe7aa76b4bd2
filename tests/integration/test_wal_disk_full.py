"""A WAL segment that cannot grow (RLIMIT_FSIZE: EFBIG with statvfs showing room): the buffer
stops by itself (exit 1) having acked nothing unwritten, one error line naming segment and errno,
no traceback; restarted, it holds every acked group exactly once.
"""

from __future__ import annotations

import threading
import time

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
RESEND_S = 2.0  # a group not acknowledged by then is sent again (the daemon may have stopped)
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


@pytest.mark.parametrize("fsync", ["always", "batch"])  # written by the fsync thread, or inline
def test_a_wal_that_cannot_grow_stops_the_buffer_cleanly_and_loses_no_acked_group(
        fsync, tmp_run_dir, spawn_python, wait_until):
    cfg = RunConfig(run_dir=str(tmp_run_dir), security=SecurityConfig(curve=False),
                    task=TaskConfig(num_prompts=100_000), model=ModelConfig(vocab_size=1024),
                    buffer=BufferConfig(address=f"tcp://127.0.0.1:{free_port()}",
                                        pub_address=f"tcp://127.0.0.1:{free_port()}",
                                        max_staleness=10_000, groups_per_step=1, capacity=10_000,
                                        fsync=fsync))
    config_file = tmp_run_dir / "config.yaml"
    config_file.write_text(to_yaml(cfg))
    buffer = spawn_python(LIMITED.format(limit=FILE_LIMIT), ["--config-file", config_file])
    log = Log(buffer.stderr)
    log.start()
    client = Client(cfg.buffer.address, timeout_s=REQUEST_S)
    acked: list[str] = []
    try:
        assert isinstance(client.request(P.Register(server_id="prod", engine_url="http://x",
                                                    policy_version=0)), P.RegisterAck)
        deadline = time.monotonic() + STREAM_S  # a bound on the whole stream, never a timing assert

        def live() -> bool:
            return buffer.poll() is None and time.monotonic() < deadline

        while live() and len(acked) < MAX_GROUPS:
            credits = client.request(P.CreditRequest(server_id="prod", max_credits=4))
            assert credits.credits, f"no credits after {len(acked)} groups: {credits}"
            for c in credits.credits:
                group, ack = group_for(c), None
                while ack is None and live():
                    try:
                        ack = client.request(group, timeout_s=RESEND_S)
                    except TransportTimeout:
                        continue  # not acknowledged: sent again while the daemon lives
                if ack is None:
                    break
                assert ack.status in ("accepted", "duplicate"), ack
                acked.append(ack.ref)
        wait_until(lambda: buffer.poll() is not None, EXIT_S, 0.1, "the buffer to stop")
    finally:
        client.close()
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
