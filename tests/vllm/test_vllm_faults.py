"""Faults with the real vLLM (the checks: tests/engine_kit.py): ``kill -9`` of the rollout server
(vLLM goes too, its whole process group, with its port, /dev/shm files and TMPDIR), and ``kill -9``
of vLLM in a running job on ``topology=cpu_vllm`` (its rollout server notices, the launcher starts
it again, and the job goes on to its last step)."""

from __future__ import annotations

import pytest
from vllm_kit import MODEL, check_killed_engine_is_relaunched, check_killed_server_takes_its_engine

from rollout_server.engine_reaper import group_members
from rollout_server.launch_vllm import VLLMProcess


def test_killing_the_rollout_server_takes_vllm_its_port_and_its_files(model_dir, tmp_path):
    def inspect(pgid: int, files: set[str]) -> None:
        assert len(group_members(pgid)) >= 2  # the API server and its engine core

    check_killed_server_takes_its_engine("vllm_kit", VLLMProcess, model_dir, tmp_path, inspect)


@pytest.mark.timeout(1800)  # a whole job with two vLLM start-ups (1-3 minutes each here)
def test_a_killed_vllm_is_noticed_relaunched_and_the_job_goes_on(model_dir, tmp_path):
    from areal_like.settings.config import load_config

    # the tier's tiny model as it is built (no warm start: what it learns does not matter here)
    cfg = load_config(["experiment=quickstart", "topology=cpu_vllm", "trainer.steps=12",
                       "trainer.checkpoint_every=4", "launch.restarts=2",
                       "launch.health_timeout_s=600", "eval.at_end=false",
                       f"model.max_position_embeddings={MODEL['max_position_embeddings']}",
                       f"run_dir={tmp_path / 'run'}", f"model.path={model_dir}",
                       "warm_start.steps=0"])
    check_killed_engine_is_relaunched(cfg, "vLLM", "vllm.entrypoints.launchers", 3, 600)
