"""Bounded weight sync on CPU (gloo): an engine killed with SIGKILL at three points of a push.

Real processes and sockets: the buffer daemon, two embedded engines, a world-size-1 trainer
(``tests/weight_pusher.py``, the real ``WeightBroadcaster``), and two rollout-server stand-ins in
this process (``weight_sync_harness.Driver``, applying plans with the real applier). Engine A is
killed by PID during the first push (v1), at one of:

* ``rendezvous``: while it joins the group, before any bucket: the trainer's rendezvous cannot
  complete and gives up at what is left of the deadline;
* ``bucket``: after its first bucket, with more to come: the next broadcast fails or the group
  breaks, the trainer tears it down;
* ``done``: after every bucket, before its ``SyncDone``: the trainer stops waiting for it when the
  buffer expires it (``buffer.heartbeat_timeout_s``), or at the deadline.

Each test checks that the v1 push returned (waited on with a generous bound; its own measured
time within the deadline plus the gathers' and the announcement's slack), that A is dropped for
v1 and its process is gone, that B's own apply of v1 ended within the deadline (no member waits
past it), and that v2 re-forms the group for B alone and B serves exactly the trainer's v2 weights.
"""

from __future__ import annotations

import pytest
from weight_sync_harness import Driver, engine_at, start_pusher, start_system, write_config

DEADLINE_S = 8.0  # the sync deadline under test: small, so a hang would show; generous for 2 shared cores
SLACK_S = 5.0  # the push's own work outside the deadline: gathers before the plan, the VersionUpdate
REPORT_WAIT_S = DEADLINE_S + 60.0  # how long the test waits for a report at most (not a timing assert)
STARTUP_S = 180.0


@pytest.mark.parametrize("fault", ["rendezvous", "bucket", "done"])
def test_engine_killed_during_a_push_is_dropped_and_the_survivor_gets_the_next_version(
        fault, tmp_path, spawn_python, free_port, wait_until):
    cfg, cfg_path = write_config(tmp_path, free_port, [
        f"trainer.weight_sync.deadline_s={DEADLINE_S}", "trainer.weight_sync.bucket_mb=0.25",
        "buffer.heartbeat_timeout_s=3"])
    engines, urls = start_system(tmp_path, spawn_python, wait_until, cfg_path, ["rollout-a", "rollout-b"])
    a = Driver("rollout-a", urls["rollout-a"], cfg.buffer.address, fault=fault, engine_pid=engines["rollout-a"].pid)
    b = Driver("rollout-b", urls["rollout-b"], cfg.buffer.address)
    for d in (a, b):
        d.start()
    pusher = start_pusher(spawn_python, cfg_path, tmp_path, [{"version": 1, "members": 2},
                                                              {"version": 2, "members": 1}])

    def report(version: int):
        assert pusher.poll() in (None, 0), f"the trainer died (exit {pusher.returncode}); see its log above"
        assert a.error is None and b.error is None, (a.error, b.error)
        from test_trainer_weight_sync import _read_json

        return _read_json(tmp_path / f"v{version}.json")

    try:
        v1 = wait_until(lambda: report(1), STARTUP_S + REPORT_WAIT_S, 0.2, "trainer push v1")
        assert a.killed.is_set(), f"the {fault} fault never fired: {v1}"
        assert v1["members"] == ["rollout-a", "rollout-b"] and v1["reform"], v1
        assert "rollout-a" in v1["dropped"] and "rollout-a" not in v1["done"], v1
        assert v1["seconds"] <= DEADLINE_S + SLACK_S, v1
        wait_until(lambda: engines["rollout-a"].poll() is not None, 30, 0.1, "engine A gone")
        ok_b, b_seconds = wait_until(lambda: b.results.get(1), REPORT_WAIT_S, 0.1, "B's report for v1")
        assert b_seconds <= DEADLINE_S + SLACK_S, b.results  # B never waited past the deadline
        if fault == "done":  # every bucket had gone out: B got v1 in full
            assert ok_b and v1["done"] == ["rollout-b"], v1
            assert engine_at(tmp_path, "rollout-b", 1)["sha"] == v1["sha"]

        v2 = wait_until(lambda: report(2), REPORT_WAIT_S, 0.2, "trainer push v2")
        assert v2["reform"] and v2["members"] == ["rollout-b"] and v2["done"] == ["rollout-b"], v2
        assert not v2["dropped"] and not v2["error"], v2
        got = wait_until(lambda: engine_at(tmp_path, "rollout-b", 2), 30, 0.1, "rollout-b at version 2")
        assert got["sha"] == v2["sha"]
        assert b.results[2][0]
    finally:
        for d in (a, b):
            d.stop.set()
        for d in (a, b):
            d.join(timeout=15)
