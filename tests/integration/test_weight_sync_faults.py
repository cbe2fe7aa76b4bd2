"""Bounded weight sync on CPU (gloo): an engine killed with SIGKILL at three points of a push.

Real processes and sockets: the buffer daemon, two embedded engines, a world-size-1 trainer
(``tests/weight_pusher.py``, the real ``WeightBroadcaster`` driving both engines), and two
rollout-server stand-ins in this process (``weight_sync_harness.Driver``: they register and
heartbeat). Engine A is killed by PID, from a proxy in front of it, during the first push (v1), at
one of:

* ``rendezvous``: as it is about to join the group, so it never does: the trainer's rendezvous
  cannot complete; it gives up as soon as A's sync fails (its call finds no engine), which closes
  its store and fails B's join at once;
* ``bucket``: after its first bucket, with more to come: the next broadcast fails or the group
  breaks, the trainer tears it down, and B's receive fails with it;
* ``done``: after every bucket, before the trainer has its answer: the trainer's call fails with
  the connection.

``rendezvous`` runs twice: with six buckets of 0.25 MB (the re-push gathers every bucket again) and
with two of 1 MB (``rendezvous-staged``: the whole model is in the staging buffers, which rank 0
sends again as they are). ``bucket`` has six: A dies after the first, so B cannot have them all.

In the first two, B survives A but misses v1 with it: the same push re-forms the group for B alone
and pushes v1 again, within the same deadline. Each test checks that the v1 push returned (waited
on with a generous bound) having blocked the trainer no longer than the deadline, that A is dropped
for v1 and its process is gone, that B serves v1 itself, exactly the trainer's weights (after a
re-push where B missed it), and that v2 reaches B alone (on the group re-formed for it during v1,
or a new one after ``done``) with exactly the trainer's weights.
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
