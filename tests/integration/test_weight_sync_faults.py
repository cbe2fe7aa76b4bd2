"""Weight sync on CPU (gloo) when a member's engine dies (SIGKILL by PID) or restarts: engine B and
the buffer are shared by the module; each test starts its own engine A and world-size-1 trainer."""

from __future__ import annotations

import pytest
from weight_sync_harness import Driver, Pusher, engine_at, module_system, start_engines

# the sync deadline under test: small, so a hang would show; room for a re-push on 2 shared cores
DEADLINE_S = 12.0
REPORT_WAIT_S = DEADLINE_S + 60.0  # the longest wait for a report (not a timing assert)
STARTUP_S = 180.0
A, B = "rollout-a", "rollout-b"


# heartbeat timeout: how soon the buffer expires a killed engine's server
system, settled = module_system("faults", [f"trainer.weight_sync.deadline_s={DEADLINE_S}",
                                           "buffer.heartbeat_timeout_s=3"], [B])


@pytest.mark.parametrize("fault", ["rendezvous", "rendezvous-staged", "bucket", "done"])
def test_engine_killed_during_a_push_is_dropped_and_the_survivor_serves_this_version(
        fault, system, tmp_path, spawn_python, wait_until):
    """A killed at the rendezvous (six or two buckets), after its first bucket or its last."""
    fault, bucket_mb = ("rendezvous", 1.0) if fault == "rendezvous-staged" else (fault, 0.25)
    engines, urls = start_engines(tmp_path, spawn_python, wait_until, system.cfg_path, [A])
    a = Driver(A, urls[A], system.cfg, fault=fault, engine_pid=engines[A].pid)
    a.start()
    v1, v2 = system.versions(2)
    # v2 waits for the test's look at B's v1 weights: its buckets would otherwise land under v1
    pusher = Pusher(spawn_python, system, tmp_path,
                    [{"version": v1, "members": 2},
                     {"version": v2, "members": 1, "after": "checked-v1"}],
                    [f"trainer.weight_sync.bucket_mb={bucket_mb}"], drivers=[a])
    try:
        r1 = pusher.report(f"v{v1}.json", STARTUP_S + REPORT_WAIT_S)
        assert a.killed.is_set(), f"the {fault} fault never fired: {r1}"
        assert r1["members"] == [A, B] and r1["reform"], r1
        assert r1["dropped"] == [A] and r1["done"] == [B], r1
        assert r1["repushed"] == ([] if fault == "done" else [B]), r1
        assert r1["blocked_s"] <= DEADLINE_S, r1  # the attempt and the re-push: one deadline
        wait_until(lambda: engines[A].poll() is not None, 30, 0.1, "engine A gone")
        got = wait_until(lambda: engine_at(system.root, B, v1), 30, 0.1, "B at v1")
        assert got["sha"] == r1["sha"]
        (tmp_path / "checked-v1").write_text("ok")

        r2 = pusher.report(f"v{v2}.json", REPORT_WAIT_S)
        assert r2["members"] == [B] and r2["done"] == [B], r2
        assert r2["reform"] == (fault == "done"), r2  # a group re-formed for B in v1 stays warm
        assert not r2["dropped"] and not r2["error"] and not r2["repushed"], r2
        got = wait_until(lambda: engine_at(system.root, B, v2), 30, 0.1, "B at v2")
        assert got["sha"] == r2["sha"]
        pusher.exited()
    finally:
        a.stop.set()
        a.join(timeout=15)


def test_a_server_restarted_between_syncs_gets_the_next_version_on_a_reformed_group(
        system, tmp_path, spawn_python, wait_until):
    """A's server and engine killed, then A with a new incarnation and engine: a new group."""
    engines, urls = start_engines(tmp_path, spawn_python, wait_until, system.cfg_path,
                                  ["old", "new"])
    first = Driver(A, urls["old"], system.cfg, fresh=True)
    first.start()
    v1, v2 = system.versions(2)
    pusher = Pusher(spawn_python, system, tmp_path,
                    [{"version": v1, "members": 2},
                     {"version": v2, "members": 2, "after": "restarted"}], drivers=[first])
    restarted = None
    try:
        r1 = pusher.report(f"v{v1}.json", STARTUP_S + REPORT_WAIT_S)
        assert r1["members"] == r1["done"] == [A, B] and r1["reform"], r1
        got = wait_until(lambda: engine_at(tmp_path, "old", v1), 30, 0.1, "the old engine at v1")
        assert got["sha"] == r1["sha"]

        spawn_python.kill9(engines["old"])
        first.stop.set()
        first.join(timeout=15)
        restarted = Driver(A, urls["new"], system.cfg, fresh=True)
        pusher.drivers.append(restarted)
        restarted.start()
        # let in once the old process is silent for buffer.heartbeat_timeout_s
        wait_until(lambda: any(m.incarnation == restarted.incarnation for m in system.roster()),
                   60, 0.05, "the restarted server registered")
        assert [(m.server_id, m.engine_url) for m in system.roster()] == [
            (A, urls["new"]), (B, system.urls[B])]
        (tmp_path / "restarted").write_text("ok")

        r2 = pusher.report(f"v{v2}.json", REPORT_WAIT_S)
        assert r2["members"] == r2["done"] == [A, B] and r2["reform"], r2
        assert not r2["dropped"] and not r2["error"], r2
        got = wait_until(lambda: engine_at(tmp_path, "new", v2), 30, 0.1, "the new engine at v2")
        assert got["sha"] == r2["sha"]
        pusher.exited()
    finally:
        for d in (first, restarted):
            if d is not None:
                d.stop.set()
                d.join(timeout=15)
