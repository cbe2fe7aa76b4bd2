"""Overlapped weight sync (push(wait=False)) on CPU, by the group (gloo) and by tensor.

The trainer pushes v1-v3 overlapped, moving every weight by +1000 after each returns: each push
returns the previous one's complete report (the last from join); the engine serves exactly the
weights at push time (SHA-256); only the first push forms the group.
"""

from __future__ import annotations

import pytest
from weight_sync_harness import Driver, engine_at, start_pusher, start_system, write_config

REPORT_WAIT_S = 120.0  # an upper bound for a loaded 2-core machine, not a timing assert
STARTUP_S = 180.0


@pytest.mark.parametrize("path", ["distributed", "tensor"])
def test_overlapped_pushes_deliver_the_packed_weights_and_report_one_version_late(
        path, tmp_path, spawn_python, free_port, wait_until):
    from test_trainer_weight_sync import read_json

    cfg, cfg_path = write_config(tmp_path, free_port, ["trainer.weight_sync.deadline_s=60"])
    engines, urls = start_system(tmp_path, spawn_python, wait_until, cfg_path, ["rollout-a"])
    a = Driver("rollout-a", urls["rollout-a"], cfg)
    a.start()
    pusher = start_pusher(spawn_python, cfg_path, tmp_path, [
        {"version": 1, "members": 1, "overlap": True, "path": path},
        {"version": 2, "members": 1, "overlap": True, "after": "checked1", "path": path},
        {"version": 3, "members": 1, "overlap": True, "after": "checked2", "path": path}])

    def report(name: str):
        assert pusher.poll() in (None, 0), (
            f"the trainer died (exit {pusher.returncode}); see its log above")
        assert a.error is None, a.error
        return read_json(tmp_path / name)

    try:
        shas = {}
        for v in (1, 2, 3):
            rep = wait_until(lambda v=v: report(f"v{v}.json"), STARTUP_S + REPORT_WAIT_S, 0.2,
                             f"push v{v}")
            shas[v] = rep["sha"]
            if v > 1:  # the previous version's report, complete
                assert rep["version"] == v - 1 and rep["overlapped"], rep
                assert rep["done"] == ["rollout-a"] and not rep["dropped"] and not rep["error"], rep
                # a group is formed once, then kept warm; the tensor path has none
                assert rep["reform"] == (v - 1 == 1 and path == "distributed"), rep
            got = wait_until(lambda v=v: engine_at(tmp_path, "rollout-a", v), REPORT_WAIT_S, 0.1,
                             f"engine at v{v}")
            # the weights at push time, not the ones moved by +1000 after it
            assert got["sha"] == shas[v]
            (tmp_path / f"checked{v}").write_text("ok")
        last = wait_until(lambda: report("last.json"), REPORT_WAIT_S, 0.2, "the last push's report")
        assert last["version"] == 3 and last["done"] == ["rollout-a"] and not last["reform"], last
        assert len(set(shas.values())) == 3
        wait_until(lambda: pusher.poll() is not None, REPORT_WAIT_S, 0.2, "the pusher to exit")
        assert pusher.returncode == 0
    finally:
        a.stop.set()
        a.join(timeout=15)
