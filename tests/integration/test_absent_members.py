"""A registered id with no engine behind it does not hold up every weight sync.

Real buffer, one engine with a Driver, a world-size-1 trainer and a fake member that heartbeats
with an engine URL that refuses connections (fails at once) or never answers (only the first push
may wait its whole deadline: SyncReport.cut). The real server always gets each version and ends on
the trainer's last weights.
"""

from __future__ import annotations

import socket
import threading

import pytest
from weight_sync_harness import Driver, engine_at, start_pusher, start_system, write_config

from areal_like.net.dealer import Client
from areal_like.wire import protocol as P

DEADLINE_S = 30.0  # a push that runs into it (90 % of it, ``cut``) was held up
REPORT_WAIT_S = DEADLINE_S + 90.0  # the longest wait for a report (not a timing assert)
STARTUP_S = 180.0
HEARTBEAT_S = 0.2
VERSIONS = (1, 2, 3)


class FakeMember(threading.Thread):
    """Registers server_id with engine_url (also its sync URL), then only heartbeats."""

    def __init__(self, address: str, server_id: str, engine_url: str):
        super().__init__(daemon=True, name=f"fake-{server_id}")
        self.address, self.server_id, self.engine_url = address, server_id, engine_url
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        client = Client(self.address, timeout_s=30)
        try:
            client.request(P.Register(server_id=self.server_id, engine_url=self.engine_url,
                                      sync_url=self.engine_url, policy_version=0, fresh=True))
            while not self.stop.wait(HEARTBEAT_S):
                client.request(P.Heartbeat(server_id=self.server_id, policy_version=0))
        except BaseException as e:  # surfaced by the test
            self.error = e
        finally:
            client.close()


@pytest.mark.parametrize("engine", ["refused", "silent"])
def test_a_member_without_an_engine_does_not_hold_up_every_sync(
        engine, tmp_path, spawn_python, free_port, wait_until):
    cfg, cfg_path = write_config(tmp_path, free_port, [
        f"trainer.weight_sync.deadline_s={DEADLINE_S}", "trainer.weight_sync.bucket_mb=1.0",
        "buffer.heartbeat_timeout_s=600"])
    # silent: the kernel completes the connections (the backlog), nobody reads or answers them
    hole = socket.create_server(("127.0.0.1", 0), backlog=128) if engine == "silent" else None
    fake_url = (f"http://127.0.0.1:{hole.getsockname()[1]}" if hole is not None
                else f"http://127.0.0.1:{free_port()}")  # nothing listens there
    engines, urls = start_system(tmp_path, spawn_python, wait_until, cfg_path, ["rollout-real"])
    real = Driver("rollout-real", urls["rollout-real"], cfg)
    fake = FakeMember(cfg.buffer.address, "fake-1", fake_url)
    real.start()
    fake.start()
    pusher = start_pusher(spawn_python, cfg_path, tmp_path,
                          [{"version": v, "members": 2} for v in VERSIONS])

    def report(version: int):
        assert pusher.poll() in (None, 0), f"trainer died (exit {pusher.returncode}): see its log"
        assert real.error is None and fake.error is None, (real.error, fake.error)
        from test_trainer_weight_sync import read_json

        return read_json(tmp_path / f"v{version}.json")

    try:
        reports = {}
        for v in VERSIONS:
            reports[v] = rep = wait_until(lambda v=v: report(v),
                                          (STARTUP_S if v == 1 else 0) + REPORT_WAIT_S, 0.2,
                                          f"trainer push v{v}")
            # whether a later push still names the fake is the trainer's choice; it never loads
            assert "rollout-real" in rep["members"] and "fake-1" not in rep["done"], rep
            if v == 1 and engine == "silent":
                continue  # it may wait its deadline for the fake, once
            assert rep["done"] == ["rollout-real"] and not rep["cut"], rep
        served = wait_until(lambda: engine_at(tmp_path, "rollout-real", VERSIONS[-1]), 30, 0.1,
                            f"the real engine at v{VERSIONS[-1]}")
        assert served["sha"] == reports[VERSIONS[-1]]["sha"]  # exactly the trainer's weights
    finally:
        for member in (real, fake):
            member.stop.set()
        for member in (real, fake):
            member.join(timeout=15)
        if hole is not None:
            hole.close()
