"""The trainer drives a push's engines itself (trainer/engine_drive.py), two real engines.

A SIGSTOPped engine's sync fails at the deadline while the other loads; a member without an engine
fails at once and is lost; a second plan waits per member for the first's task; a member leaving
the roster has its clients closed; each member is driven as its roster kind names.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import pytest
from weight_sync_harness import SyncStandIn, engine_at, start_system, write_config

DEADLINE_S = 8.0  # the plan's: the frozen member's sync ends failed by then
KEY = "k" * 32  # the job's engine key (the embedded engines take any)


def _disk_plan(members: list[str], path: str, version: int):
    from areal_like.weights.plan import SyncMember, WeightSyncPlan

    return WeightSyncPlan(
        policy_version=version, group_name="", master_addr="", master_port=0, world_size=1,
        backend="gloo", reform=False, buckets=[], deadline_s=DEADLINE_S, plan_id=f"p{version}",
        members=[SyncMember(server_id=s, rank_offset=1 + i) for i, s in enumerate(members)],
        path="disk", payloads=[path])


@pytest.mark.timeout(300)
def test_a_frozen_member_fails_at_the_deadline_and_the_other_loads(
        tmp_path, spawn_python, free_port, wait_until):
    from areal_like.weights.hf import build_model
    from areal_like.wire.protocol import RosterEntry
    from trainer.engine_drive import EngineDrive

    cfg, cfg_path = write_config(tmp_path, free_port, [])
    build_model(cfg.model).save_pretrained(tmp_path / "v1")
    engines, urls = start_system(tmp_path, spawn_python, wait_until, cfg_path, ["a", "b"])
    # for a member whose entry names no kind
    drive = EngineDrive(kind="vllm", pause_mode="abort", engine_key=KEY)
    urls["dead"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    ports = {s: SyncStandIn(s, u, KEY) for s, u in urls.items()}  # each member's server's
    os.kill(engines["a"].pid, signal.SIGSTOP)
    try:
        kinds = {"a": "embedded", "b": "embedded", "dead": ""}
        entries = [RosterEntry(server_id=s, engine_url=u, engine_ranks=1, policy_version=0,
                               engine_kind=kinds[s], sync_url=ports[s].url)
                   for s, u in urls.items()]
        drive.start(_disk_plan(["a", "b", "dead"], str(tmp_path / "v1"), 1), entries)
        wait_until(lambda: drive.failed() == ["dead"], DEADLINE_S, 0.05, "the dead one failing")
        first, lost = dict(drive.runs), drive.unreachable  # the first plan's
        gone = [e for e in entries if e.server_id != "dead"]  # the dead one left the roster
        drive.start(_disk_plan(["a", "b"], str(tmp_path / "v1"), 2), gone)  # a's first runs on
        second = drive.wait(time.monotonic() + DEADLINE_S + 30)
        # its clients closed
        assert not {urls["dead"], ports["dead"].url} & {url for _, url, _ in drive.clients}
        assert second["b"].ok and not second["a"].ok, second
        assert "its sync of the last plan has not ended" in second["a"].reason, second
        assert drive.lost() == {"a"}  # wedged: not re-pushed either
        done, _ = concurrent.futures.wait(first.values(), timeout=DEADLINE_S + 60)
        results = {s: f.result() for s, f in first.items()}
        assert len(done) == 3 and results["b"].ok and not results["a"].ok, results
        assert not results["dead"].ok, results
        assert "deadline" in results["a"].reason or "Timeout" in results["a"].reason, results
        wait_until(lambda: engine_at(tmp_path, "b", 2), 30, 0.1, "engine b at v2")
        assert engine_at(tmp_path, "a", 1) is None
        assert lost == {"a", "dead"}  # neither answers /health (``a``: ended by now)
        # a member's server is told how its sync ended after its result (the push goes on)
        wait_until(lambda: len(ports["a"].calls) >= 2 and len(ports["b"].calls) >= 4, 60, 0.05,
                   "each member's last /end")
        assert ports["a"].calls == [("begin", "p1"), ("end", "p1", False)]
        assert ports["b"].calls == [("begin", "p1"), ("end", "p1", True),
                                    ("begin", "p2"), ("end", "p2", True)]
    finally:
        os.kill(engines["a"].pid, signal.SIGCONT)
        drive.close()
        for port in ports.values():
            port.close()
