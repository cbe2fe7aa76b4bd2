"""The trainer drives the engines of a push itself (``trainer/engine_drive.py``;
trainer/WEIGHT_SYNC.md, "Who drives the engines").

Real processes: two embedded engines (``test_trainer_weight_sync.engine_role``, each writes its
served version and the SHA-256 of its weights whenever the version changes), driven from this
process through a disk plan (the model's directory). One member's engine is frozen by SIGSTOP, by
PID: its sync ends failed at the plan's deadline, the other member's loads, and ``wait`` answers
by the deadline. A member with no engine behind its URL is reported failed at once, and ``lost``
(no ``/health`` answer either), the frozen one too. The drive's own kind is vLLM's, the two
engines' roster kind ``embedded``: each member is driven as its roster entry names (a vLLM client
fails on the embedded engine: it has no ``/pause``).
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from weight_sync_harness import engine_at, start_system, write_config

DEADLINE_S = 8.0  # the plan's: the frozen member's sync ends failed by then


def _disk_plan(members: list[str], path: str, version: int):
    from areal_like.wire.protocol import SyncMember, WeightSyncPlan

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
    drive = EngineDrive(kind="vllm", pause_mode="abort")  # for a member whose entry names none
    os.kill(engines["a"].pid, signal.SIGSTOP)
    try:
        urls["dead"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        kinds = {"a": "embedded", "b": "embedded", "dead": ""}
        drive.start(_disk_plan(["a", "b", "dead"], str(tmp_path / "v1"), 1),
                    [RosterEntry(server_id=s, engine_url=u, engine_ranks=1, policy_version=0,
                                 engine_kind=kinds[s]) for s, u in urls.items()])
        wait_until(lambda: drive.failed() == ["dead"], DEADLINE_S, 0.05, "the dead one failing")
        results = drive.wait(time.monotonic() + DEADLINE_S + 30)
        assert sorted(results) == ["a", "b", "dead"], results
        assert results["b"].ok and not results["a"].ok and not results["dead"].ok, results
        assert "deadline" in results["a"].reason or "Timeout" in results["a"].reason, results
        wait_until(lambda: engine_at(tmp_path, "b", 1), 30, 0.1, "engine b at v1")
        assert engine_at(tmp_path, "a", 1) is None
        assert drive.failed() == ["a", "dead"]
        assert drive.lost() == {"a", "dead"}  # neither answers /health
    finally:
        os.kill(engines["a"].pid, signal.SIGCONT)
        drive.close()
