"""run_sandboxed: one call of user code in a worker process, per failure kind (crash, hang, fork
bomb, memory hog), its limits and its environment; and the reward pool scoring a fork bomb.

The functions live in tests/unit/reward_fns.py, imported by path inside the workers.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from areal_like.net.auth import ENGINE_KEY_ENV, METRICS_TOKEN_ENV, SECRET_NAME
from areal_like.net.metrics import Metrics
from areal_like.settings.config import TaskConfig, load_config
from areal_like.tasks.task import Example
from benchmarks.sandbox_call import SandboxResult, run_sandboxed
from rollout_server.__main__ import private_dirs
from rollout_server.reward_pool import RewardPool
from rollout_server.reward_worker import SECRET_NAME as WORKER_SECRET_NAME  # a stdlib-only copy
from rollout_server.sandbox import SandboxLimits
from tests.conftest import live_children

LIMITS = SandboxLimits(timeout_s=5.0, memory_mb=512)


def test_a_call_returns_its_json_result_and_leaves_no_process():
    before = live_children()
    assert (run_sandboxed("reward_fns:add", (2, 3), LIMITS)
            == SandboxResult(True, {"sum": 5, "args": [2, 3]}))
    assert live_children() == before


SHORT = SandboxLimits(timeout_s=1.0, memory_mb=512)


@pytest.mark.parametrize("fn,args,limits,kind,reason", [
    ("segfault", (), LIMITS, "died", "worker died: signal 11"),
    ("behave", ("crash", None), LIMITS, "error", "ZeroDivisionError: division by zero on purpose"),
    ("behave", ("hang", None), SHORT, "timeout", "timeout after 1.0s"),  # killed by PID, reaped
    ("fork_bomb", (64,), LIMITS, "error", "BlockingIOError"),  # the very first fork is refused
    ("spin_forks", (), SHORT, "timeout", "timeout"),  # ignores the refusals
    ("behave", ("hog", None), SandboxLimits(timeout_s=5.0, memory_mb=256), "memory", "MemoryError"),
    ("no_such_function", (), LIMITS, "start", "no_such_function"),
])
def test_each_failure_kind_is_reported_with_its_reason_and_leaves_no_process(fn, args, limits,
                                                                             kind, reason):
    before = live_children()
    got = run_sandboxed(f"reward_fns:{fn}", args, limits)
    assert (got.ok, got.kind) == (False, kind) and reason in got.reason, got
    assert live_children() == before


def test_allowed_processes_are_allowed():
    assert run_sandboxed("reward_fns:fork_bomb", (2,), SandboxLimits(timeout_s=5.0, memory_mb=512,
                                                                     processes=2)).value == 2


def test_the_call_runs_confined_and_without_secrets(monkeypatch):
    secrets = {ENGINE_KEY_ENV, METRICS_TOKEN_ENV, "WANDB_API_KEY", "HF_TOKEN", "DB_PASSWORD",
               "MY_SECRET"}
    for name in secrets:
        monkeypatch.setenv(name, "s3cret")
    got = run_sandboxed("reward_fns:identity", (), LIMITS)
    assert got.ok and not secrets & set(got.value["env"]), got
    assert got.value["memory"] == 512 * 2**20
    # root drops to a uid of its own, where RLIMIT_NPROC binds: itself and nothing else
    if os.geteuid() == 0:
        assert got.value["uid"] != 0 and got.value["nproc"] == 1
    else:
        assert got.value["nproc"] >= 1


def test_reward_pool_scores_a_fork_bomb_as_failed_and_counts_it():
    metrics = Metrics()
    pool = RewardPool(TaskConfig(reward_timeout_s=5.0, reward_workers=1, reward_memory_mb=512),
                      "reward_fns:behave_or_bomb", metrics=metrics)
    try:
        example = Example("q", "a")
        got = asyncio.run(pool.score_group("q", ["bomb", "1.5"], example))
        assert (got[0][0] == 0.0 and got[0][1].startswith("BlockingIOError")
                and got[1] == (1.5, None))
        value = metrics.registry.get_sample_value("areal_rollout_reward_failures_total",
                                                  {"kind": "error"})
        assert value == 1.0
    finally:
        pool.close()


def test_the_worker_scrubs_what_the_job_calls_secret():
    assert (WORKER_SECRET_NAME.pattern == SECRET_NAME.pattern
            and WORKER_SECRET_NAME.flags == SECRET_NAME.flags)


def test_the_run_directorys_own_keys_are_hidden_beside_a_copy_elsewhere(tmp_path):
    """A node given a copy of the keys (``security.keys_dir``) on a shared run directory: the run
    directory's ``keys/`` holds the trainer's secret key too, and reward code must not read it
    (before: only the copy was hidden)."""
    cfg = load_config([f"run_dir={tmp_path / 'run'}", f"security.keys_dir={tmp_path / 'copy'}"])
    dirs = {Path(d) for d in private_dirs(cfg)}
    assert {tmp_path / "copy", tmp_path / "run" / "keys", tmp_path / "run" / "secrets"} <= dirs
