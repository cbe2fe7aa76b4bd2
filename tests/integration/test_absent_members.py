"""A registered id with no engine behind it holds up one weight sync, not every one.

Real processes and sockets: the buffer daemon, one embedded engine driven by a rollout-server
stand-in (``weight_sync_harness.Driver``, the real applier), a world-size-1 trainer
(``tests/weight_pusher.py``, the real ``WeightBroadcaster``), and a fake member: a socket that
registers an id and heartbeats, as any holder of a member key can, but never joins a sync nor
answers one. Before, the fake id joined every plan and every sync waited its whole deadline for it.

Now v1 (both members) waits for it until its deadline, as it must (the trainer cannot tell it from a
slow engine yet); the buffer then leaves it out of the roster's members (``Roster.absent``), so v2
and v3 are planned for the real server alone, which catches up on v2 by the ordinary path (a full
push to a re-formed group) and serves exactly the trainer's weights. The fake stays on the roster
all along (it heartbeats): it is left out, not expired. A late ``SyncDone`` from it (what a real
server that missed a plan sends) brings it back into the members.
"""

from __future__ import annotations

import threading

from weight_sync_harness import Driver, engine_at, start_pusher, start_system, write_config

from areal_like.net.dealer import Client
from areal_like.wire import protocol as P

DEADLINE_S = 8.0  # what v1 waits for the fake (the rendezvous, then the reports' margin)
REPORT_WAIT_S = DEADLINE_S + 90.0  # the longest wait for a report (not a timing assert)
STARTUP_S = 180.0
HEARTBEAT_S = 0.2


class FakeMember(threading.Thread):
    """Registers ``server_id`` with an engine URL nothing answers, then only heartbeats."""

    def __init__(self, address: str, server_id: str):
        super().__init__(daemon=True, name=f"fake-{server_id}")
        self.address, self.server_id = address, server_id
        self.stop, self.registered = threading.Event(), threading.Event()
        self.plans: set[int] = set()  # versions of the plans the buffer offered it
        self.error: BaseException | None = None

    def run(self) -> None:
        client = Client(self.address, timeout_s=30)
        try:
            client.request(P.Register(server_id=self.server_id, engine_url="http://127.0.0.1:1",
                                      policy_version=0, fresh=True))
            self.registered.set()
            while not self.stop.wait(HEARTBEAT_S):
                ack = client.request(P.Heartbeat(server_id=self.server_id, policy_version=0))
                if ack.pending_plan is not None:
                    self.plans.add(ack.pending_plan.policy_version)
        except BaseException as e:  # surfaced by the test
            self.error = e
        finally:
            client.close()


def test_a_member_that_never_joins_holds_up_one_sync_and_is_left_out_of_the_next(
        tmp_path, spawn_python, free_port, wait_until):
    cfg, cfg_path = write_config(tmp_path, free_port, [
        f"trainer.weight_sync.deadline_s={DEADLINE_S}", "trainer.weight_sync.bucket_mb=1.0",
        "buffer.heartbeat_timeout_s=600"])
    engines, urls = start_system(tmp_path, spawn_python, wait_until, cfg_path, ["rollout-real"])
    real = Driver("rollout-real", urls["rollout-real"], cfg.buffer.address)
    fake = FakeMember(cfg.buffer.address, "fake-1")
    real.start()
    fake.start()
    roster = Client(cfg.buffer.address, timeout_s=30)
    pusher = start_pusher(spawn_python, cfg_path, tmp_path, [
        {"version": 1, "members": 2}, {"version": 2, "members": 1}, {"version": 3, "members": 1}])

    def report(version: int):
        assert pusher.poll() in (None, 0), f"trainer died (exit {pusher.returncode}): see its log"
        assert real.error is None and fake.error is None, (real.error, fake.error)
        from test_trainer_weight_sync import _read_json

        return _read_json(tmp_path / f"v{version}.json")

    try:
        v1 = wait_until(lambda: report(1), STARTUP_S + REPORT_WAIT_S, 0.2, "trainer push v1")
        assert v1["members"] == ["fake-1", "rollout-real"], v1
        assert "fake-1" in v1["dropped"] and v1["error"], v1  # the rendezvous waited for it in vain
        assert 1 in fake.plans, fake.plans  # it was offered v1, and never answered

        got = roster.request(P.RosterRequest())
        assert got.absent == ["fake-1"], got  # on the roster (it heartbeats), out of the syncs

        for version in (2, 3):
            rep = wait_until(lambda v=version: report(v), REPORT_WAIT_S, 0.2, f"push v{version}")
            assert rep["members"] == ["rollout-real"] and rep["done"] == ["rollout-real"], rep
            assert not rep["dropped"] and not rep["error"], rep
        assert fake.plans == {1}, fake.plans  # no later plan named it
        served = wait_until(lambda: engine_at(tmp_path, "rollout-real", 3), 30, 0.1, "real at v3")
        assert served["sha"] == rep["sha"]  # the real server caught up: the trainer's weights

        # what a real server that missed a plan sends, late: it is back in the members
        late = P.SyncDone(server_id="fake-1", policy_version=1, ok=False)
        assert roster.request(late).status == "ok"
        got = roster.request(P.RosterRequest())
        assert sorted(m.server_id for m in got.members) == ["fake-1", "rollout-real"], got
        assert not got.absent, got
    finally:
        for member in (real, fake):
            member.stop.set()
        for member in (real, fake):
            member.join(timeout=15)
        roster.close()
