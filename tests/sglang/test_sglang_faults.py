"""Faults with the real SGLang (the checks: tests/engine_kit.py): ``kill -9`` of the rollout server
(SGLang goes too, with its port, /dev/shm files and TMPDIR), and ``kill -9`` of SGLang in a
running job (its rollout server notices, the launcher starts it again, and the job goes on).

Mutations checked (each made once, each failed its test): ``SGLangProcess.start`` without the
reaper (the /dev/shm files stayed); ``engine_reaper.shm_files`` without the semaphores its group
maps under an unlinked name (SGLang's ``sem.mp-*`` stayed); ``raise_if_engine_died`` returning at
once (the rollout server left on "5 episodes failed in a row" instead)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from sglang_kit import check_killed_engine_is_relaunched, check_killed_server_takes_its_engine

from rollout_server.engine_reaper import group_members
from rollout_server.launch_sglang import SGLangProcess

# where system_harness.warm_model keeps the quickstart's warm start
WARM_CACHE = Path(tempfile.gettempdir()) / "areal-like-test-warmstart" / "warm" / "warmstart"


def _mapped_semaphores(pgid: int) -> set[str]:
    """The /dev/shm/sem.* files the processes of group ``pgid`` map, by inode: a semaphore's creator
    maps it under glibc's temporary name, unlinked since (the test's own reading of /proc)."""
    inodes = set()
    for pid in group_members(pgid):
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            cols = line.split(None, 5)
            if len(cols) == 6 and cols[5].startswith("/dev/shm/sem."):
                inodes.add(int(cols[4]))
    return {e.path for e in os.scandir("/dev/shm")
            if e.name.startswith("sem.") and e.inode() in inodes}


def test_killing_the_rollout_server_takes_sglang_its_port_and_its_files(model_dir, tmp_path):
    def inspect(pgid: int, files: set[str]) -> None:
        assert any("sglang_loads_" in f for f in files), files  # left by SGLang even on SIGTERM
        sems = _mapped_semaphores(pgid)  # tqdm's lock in the scheduler: left even on SIGTERM
        assert any("/sem.mp-" in f for f in sems) and sems <= files, (sems, files)

    check_killed_server_takes_its_engine("sglang_kit", SGLangProcess, model_dir, tmp_path, inspect)


@pytest.mark.timeout(1800)  # a whole job with two SGLang start-ups (up to ~2 min each here)
def test_a_killed_sglang_is_noticed_relaunched_and_the_job_goes_on(tmp_path):
    from areal_like.settings.config import load_config
    from launch.warmstart import ensure_warm_start

    over = ["experiment=quickstart", "topology=cpu_sglang", "trainer.steps=30",
            "trainer.checkpoint_every=10", "launch.restarts=2", "launch.health_timeout_s=300",
            "eval.at_end=false"]
    # the quickstart's warm start, from the main tier's cache (the same key: not trained again)
    warm = ensure_warm_start(load_config([*over, f"run_dir={tmp_path / 'warm' / 'run'}",
                                          f"warm_start.cache_dir={WARM_CACHE}"]),
                             log=lambda m: None)
    cfg = load_config([*over, f"run_dir={tmp_path / 'run'}", f"model.path={warm.model.path}",
                       "warm_start.steps=0"])
    check_killed_engine_is_relaunched(cfg, "SGLang", "sglang.launch_server", 5, 300)
