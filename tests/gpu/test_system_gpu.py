"""The whole system on a GPU node, started by the real supervisor (marker gpu; skipped without
CUDA).

topology=gpu_embedded: one rollout server whose embedded engine runs on CUDA and a 1-rank trainer
on CUDA, for a few steps of the quickstart recipe. NCCL refuses two ranks on one device, so the
weight group uses gloo on CUDA tensors (the 1-GPU case every developer machine has; multi-GPU
NCCL sync is covered by test_nccl_weight_sync.py). Checks: every step trained and published, the
staleness bound held, every sync reached the engine, and after the last sync the engine's weights
equal the trainer's last checkpoint exactly.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from system_harness import (  # noqa: E402
    RunningSystem,
    checkpoint_checksum,
    checksum,
    engine_weights,
    system_config,
    warm_model,
)

STEPS = 8
WARM_CACHE = Path(tempfile.gettempdir()) / "areal-like-test-warmstart"


@pytest.mark.timeout(600)
def test_system_on_cuda(tmp_path):
    from safetensors import safe_open

    model = warm_model(WARM_CACHE)
    with safe_open(str(Path(model) / "model.safetensors"), "pt") as f:
        names = sorted(f.keys())
    cfg = system_config(tmp_path / "run", model, "topology=gpu_embedded",
                        "trainer.weight_sync.backend=gloo", "launch.num_rollout_servers=1",
                        "launch.trainer_ranks=1", f"trainer.steps={STEPS}",
                        "buffer.max_staleness=2")
    with RunningSystem(cfg) as system:
        roster = system.wait_for(lambda: (r := system.roster()) and len(r) == 1 and r, 300,
                                 "the rollout server")
        url = next(iter(roster.values())).engine_url
        system.wait_for(system.completed.is_set, 400, "the trainer to finish")
        # the job is complete; its daemons wait for us
        final = engine_weights(url, names, system.engine_key)
        trainer_sum = checkpoint_checksum(system.run_dir, STEPS)
        system.release.set()
        system.wait_for(system.finished, 120, "the job to stop")
    assert final is not None and final[0] == STEPS
    assert system.code == 0, system.tail()
    steps = system.steps()
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert all(r["staleness_max"] <= 2 and r["weight_sync"]["done"] == ["rollout-0"] for r in steps)
    assert checksum(final[1]) == pytest.approx(trainer_sum, rel=1e-9)
