"""Bounded weight sync on CPU (gloo): engine A killed by SIGKILL at one point of push v1.

Real buffer, two embedded engines, a world-size-1 trainer (tests/weight_pusher.py) and two Driver
stand-ins. Faults: rendezvous (six 0.25 MB buckets, or two 1 MB: "rendezvous-staged"), bucket (after
the first of six) and done. Each checks: v1 returned within the deadline, A dropped and gone, B
serving v1 with the trainer's exact weights (re-pushed where it missed it), and v2 to B alone.
"""

from __future__ import annotations

import pytest
from weight_sync_harness import Driver, engine_at, start_pusher, start_system, write_config

# the sync deadline under test: small, so a hang would show; room for a re-push on 2 shared cores
DEADLINE_S = 12.0
HEARTBEAT_TIMEOUT_S = 3.0  # how soon the buffer expires the killed engine's server
# how long the test waits for a report at most (not a timing assert)
REPORT_WAIT_S = DEADLINE_S + 60.0
STARTUP_S = 180.0


@pytest.mark.parametrize("fault", ["rendezvous", "rendezvous-staged", "bucket", "done"])
def test_engine_killed_during_a_push_is_dropped_and_the_survivor_serves_this_version(
        fault, tmp_path, spawn_python, free_port, wait_until):
    # the model: 1.3 MB
    fault, bucket_mb = ("rendezvous", 1.0) if fault == "rendezvous-staged" else (fault, 0.25)
    cfg, cfg_path = write_config(tmp_path, free_port, [
        f"trainer.weight_sync.deadline_s={DEADLINE_S}",
        f"trainer.weight_sync.bucket_mb={bucket_mb}",
        f"buffer.heartbeat_timeout_s={HEARTBEAT_TIMEOUT_S}"])
    engines, urls = start_system(tmp_path, spawn_python, wait_until, cfg_path,
                                 ["rollout-a", "rollout-b"])
    a = Driver("rollout-a", urls["rollout-a"], cfg, fault=fault,
               engine_pid=engines["rollout-a"].pid)
    b = Driver("rollout-b", urls["rollout-b"], cfg)
    for d in (a, b):
        d.start()
    # v2 waits for the test's look at B's v1 weights: its buckets would otherwise land under
    # B's v1 label
    pusher = start_pusher(spawn_python, cfg_path, tmp_path,
                          [{"version": 1, "members": 2},
                           {"version": 2, "members": 1, "after": "checked-v1"}])

    def report(version: int):
        assert pusher.poll() in (None, 0), (
            f"the trainer died (exit {pusher.returncode}); see its log above")
        assert a.error is None and b.error is None, (a.error, b.error)
        from test_trainer_weight_sync import read_json

        return read_json(tmp_path / f"v{version}.json")

    try:
        v1 = wait_until(lambda: report(1), STARTUP_S + REPORT_WAIT_S, 0.2, "trainer push v1")
        assert a.killed.is_set(), f"the {fault} fault never fired: {v1}"
        assert v1["members"] == ["rollout-a", "rollout-b"] and v1["reform"], v1
        # B has v1, from this push
        assert v1["dropped"] == ["rollout-a"] and v1["done"] == ["rollout-b"], v1
        assert v1["repushed"] == ([] if fault == "done" else ["rollout-b"]), v1
        # the attempt and the re-push together: one deadline
        assert v1["blocked_s"] <= DEADLINE_S, v1
        wait_until(lambda: engines["rollout-a"].poll() is not None, 30, 0.1, "engine A gone")
        got = wait_until(lambda: engine_at(tmp_path, "rollout-b", 1), 30, 0.1,
                         "rollout-b at version 1")
        assert got["sha"] == v1["sha"]
        (tmp_path / "checked-v1").write_text("ok")

        v2 = wait_until(lambda: report(2), REPORT_WAIT_S, 0.2, "trainer push v2")
        assert v2["members"] == ["rollout-b"] and v2["done"] == ["rollout-b"], v2
        # the group re-formed for B during v1 stays warm
        assert v2["reform"] == (fault == "done"), v2
        assert not v2["dropped"] and not v2["error"] and not v2["repushed"], v2
        got = wait_until(lambda: engine_at(tmp_path, "rollout-b", 2), 30, 0.1,
                         "rollout-b at version 2")
        assert got["sha"] == v2["sha"]
    finally:
        for d in (a, b):
            d.stop.set()
        for d in (a, b):
            d.join(timeout=15)
