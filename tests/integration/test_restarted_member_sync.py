"""A rollout server relaunched while a plan naming it is pending is left out of it.

Real processes and sockets: the buffer daemon, two embedded engines, a world-size-1 trainer
(``tests/weight_pusher.py``, the real ``WeightBroadcaster``), and rollout-server stand-ins in this
process (``weight_sync_harness.Driver``, applying plans with the real applier). Server
``rollout-a`` gets plan v1 and dies with its engine as it is about to join (killed by PID: what
happens to a rollout server whose SGLang is killed). The buffer expires it, and the trainer gives
up on v1 and tears its store down. Then ``rollout-a`` is relaunched with a new engine and
registers as a new process while v1 is still within its deadline at the buffer.

Before the fix the buffer handed it v1 in its first ``HeartbeatAck``: it joined a group that nobody
formed any more, which with SGLang blocks the scheduler in the join, fails the post-sync probe
(``/health_generate``) and restarts the server once more. Now the relaunched server never takes v1
up (its registration counts as its failure for v1), and the next push (v2) re-forms the group
with it and gives it exactly the trainer's weights.

What keeps v1 from it is its failure, recorded when the relaunched one registers as a new
process (another ``Register.incarnation``); its expiry records none, as the dead server had been
handed v1 (tests/unit/test_roster_absent.py checks the expiry's record alone). Mutation checked:
both records removed (``ControlPlane.expire`` and ``ControlPlane.register`` recording no failure):
the relaunched server took v1 up on its first heartbeat and this test failed.
"""

from __future__ import annotations

import time

from test_trainer_weight_sync import _read_json
from weight_sync_harness import Driver, engine_at, start_pusher, start_system, write_config

from areal_like.net.dealer import Client
from areal_like.wire.protocol import RosterRequest, SyncStatusRequest

DEADLINE_S = 30.0  # long enough that the relaunch falls well inside v1's deadline at the buffer
HEARTBEAT_TIMEOUT_S = 3.0  # how soon the buffer expires the dead server
SETTLE_S = 2.0  # the relaunched server's heartbeats (every 0.1 s) in which it must not take v1 up
REPORT_WAIT_S = DEADLINE_S + 60.0  # the longest wait for a report (not a timing assert)
STARTUP_S = 180.0


def test_a_server_relaunched_during_a_push_skips_its_plan_and_gets_the_next(
        tmp_path, spawn_python, free_port, wait_until):
    overrides = [f"trainer.weight_sync.deadline_s={DEADLINE_S}",
                 f"buffer.heartbeat_timeout_s={HEARTBEAT_TIMEOUT_S}"]
    cfg, cfg_path = write_config(tmp_path, free_port, overrides)
    engines, urls = start_system(tmp_path, spawn_python, wait_until, cfg_path, ["old", "new"])
    first = Driver("rollout-a", urls["old"], cfg.buffer.address, fault="rendezvous",
                   engine_pid=engines["old"].pid)
    first.start()
    pushes = [{"version": 1, "members": 1}, {"version": 2, "members": 1, "after": "relaunched"}]
    pusher = start_pusher(spawn_python, cfg_path, tmp_path, pushes)
    buffer = Client(cfg.buffer.address, timeout_s=10)
    relaunched = None

    def report(version: int):
        assert pusher.poll() in (None, 0), f"the trainer died (exit {pusher.returncode})"
        return _read_json(tmp_path / f"v{version}.json")

    def roster() -> list[str]:
        return [m.server_id for m in buffer.request(RosterRequest()).members]

    try:
        v1 = wait_until(lambda: report(1), STARTUP_S + REPORT_WAIT_S, 0.2, "trainer push v1")
        seen_v1 = time.monotonic()
        assert first.killed.is_set() and first.taken == [(1, first.taken[0][1])], first.taken
        assert v1["members"] == v1["dropped"] == ["rollout-a"] and not v1["done"], v1

        relaunched = Driver("rollout-a", urls["new"], cfg.buffer.address, fresh=True)
        relaunched.start()
        wait_until(lambda: roster() == ["rollout-a"], 30, 0.05, "the relaunched server registered")
        # the buffer would still hand v1 out: its deadline started when the push published it
        assert v1["seconds"] + (time.monotonic() - seen_v1) < DEADLINE_S - SETTLE_S, v1
        time.sleep(SETTLE_S)
        assert relaunched.error is None, relaunched.error
        assert relaunched.taken == [], relaunched.taken  # v1 is not its plan
        assert "rollout-a" in buffer.request(SyncStatusRequest(policy_version=1)).failed
        (tmp_path / "relaunched").write_text("ok")

        v2 = wait_until(lambda: report(2), REPORT_WAIT_S, 0.2, "trainer push v2")
        assert v2["members"] == ["rollout-a"] and v2["done"] == ["rollout-a"] and v2["reform"], v2
        got = wait_until(lambda: engine_at(tmp_path, "new", 2), 30, 0.1, "the new engine at v2")
        assert got["sha"] == v2["sha"]
        assert [v for v, _ in relaunched.taken] == [2], relaunched.taken
        assert relaunched.results[2][0], relaunched.attempts
    finally:
        buffer.close()
        for d in (first, relaunched):
            if d is not None:
                d.stop.set()
                d.join(timeout=15)
