"""A rollout server restarted (new incarnation, new engine) between two syncs gets the next
version: the trainer re-forms the group for the new process, whose engine then serves exactly the
trainer's weights.
"""

from __future__ import annotations

from test_trainer_weight_sync import read_json
from weight_sync_harness import Driver, engine_at, start_pusher, start_system, write_config

from areal_like.net.dealer import Client
from areal_like.wire.protocol import RosterRequest

DEADLINE_S = 30.0
REPORT_WAIT_S = DEADLINE_S + 60.0  # the longest wait for a report (not a timing assert)
STARTUP_S = 180.0


def test_a_server_restarted_between_syncs_gets_the_next_version_on_a_reformed_group(
        tmp_path, spawn_python, free_port, wait_until):
    cfg, cfg_path = write_config(tmp_path, free_port,
                                 [f"trainer.weight_sync.deadline_s={DEADLINE_S}"])
    engines, urls = start_system(tmp_path, spawn_python, wait_until, cfg_path, ["old", "new"])
    first = Driver("rollout-a", urls["old"], cfg, fresh=True)
    first.start()
    pushes = [{"version": 1, "members": 1}, {"version": 2, "members": 1, "after": "restarted"}]
    pusher = start_pusher(spawn_python, cfg_path, tmp_path, pushes)
    buffer = Client(cfg.buffer.address, timeout_s=10)
    restarted = None

    def report(version: int):
        assert pusher.poll() in (None, 0), f"the trainer died (exit {pusher.returncode})"
        for d in (first, restarted):
            assert d is None or d.error is None, d.error
        return read_json(tmp_path / f"v{version}.json")

    def a_entry():
        members = buffer.request(RosterRequest()).members
        assert [m.server_id for m in members] == ["rollout-a"], members
        return members[0]

    try:
        v1 = wait_until(lambda: report(1), STARTUP_S + REPORT_WAIT_S, 0.2, "trainer push v1")
        assert v1["members"] == v1["done"] == ["rollout-a"] and v1["reform"], v1
        got = wait_until(lambda: engine_at(tmp_path, "old", 1), 30, 0.1, "the old engine at v1")
        assert got["sha"] == v1["sha"]

        # the server dies with its engine, and is restarted with a new one under the same id
        spawn_python.kill9(engines["old"])
        first.stop.set()
        first.join(timeout=15)
        restarted = Driver("rollout-a", urls["new"], cfg, fresh=True)
        restarted.start()
        # let in once the old process is silent for buffer.heartbeat_timeout_s (15 s)
        # (the roster may be empty a moment: the old entry expired, the new Register not retried)
        wait_until(lambda: any(m.incarnation == restarted.incarnation
                               for m in buffer.request(RosterRequest()).members), 60, 0.05,
                   "the restarted server registered")
        assert a_entry().engine_url == urls["new"]
        (tmp_path / "restarted").write_text("ok")

        v2 = wait_until(lambda: report(2), REPORT_WAIT_S, 0.2, "trainer push v2")
        assert v2["members"] == v2["done"] == ["rollout-a"] and v2["reform"], v2
        assert not v2["dropped"] and not v2["error"], v2
        got = wait_until(lambda: engine_at(tmp_path, "new", 2), 30, 0.1, "the new engine at v2")
        assert got["sha"] == v2["sha"]
    finally:
        buffer.close()
        for d in (first, restarted):
            if d is not None:
                d.stop.set()
                d.join(timeout=15)
