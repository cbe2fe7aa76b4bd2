"""A whole LoRA job on the real SGLang (``experiment=quickstart_lora topology=cpu_sglang``): each
version's adapter reaches SGLang on the disk path, and with ``trainer.weight_sync.overlap`` (the
default) the push finishes in the background while the next step trains (trainer/weight_local.py:
the adapter is copied while staging, so a later step cannot change what is written)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from sglang_kit import MODEL, save_model

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))
from system_harness import RunningSystem  # noqa: E402

STEPS = 12


@pytest.mark.timeout(1500)  # one SGLang start-up (up to ~2 min on a loaded machine) and 12 steps
def test_a_lora_job_on_sglang_syncs_every_adapter_in_the_background(tmp_path):
    from areal_like.settings.config import load_config

    cfg = load_config([
        "experiment=quickstart_lora", "topology=cpu_sglang", f"trainer.steps={STEPS}",
        f"model.path={save_model(tmp_path / 'base')}", "warm_start.steps=0",
        "eval.at_start=false", "eval.at_end=false",
        "launch.health_timeout_s=300", f"run_dir={tmp_path / 'run'}",
        f"model.max_position_embeddings={MODEL['max_position_embeddings']}",
    ])
    assert cfg.trainer.weight_sync.overlap  # the default this test is about
    with RunningSystem(cfg) as rs:
        rs.wait_for(rs.completed.is_set, 1200, "the job's last step")
        steps = rs.steps()
    assert steps[-1]["step"] == STEPS
    syncs = [s["weight_sync"] for s in steps[1:]]  # step 1's report is the initial push's
    # each push but the first returned while its adapter was still on its way (the report is the
    # previous push's, complete): delivered to the one server, nobody dropped, the adapter alone
    assert all(w["overlapped"] and w["done"] == ["rollout-0"] and not w["dropped"]
               for w in syncs), syncs
    assert all(0 < w["bytes"] < 1_000_000 for w in syncs), [w["bytes"] for w in syncs]
