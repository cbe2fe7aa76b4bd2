"""RewardPool with real worker processes: failures are contained, scored 0 with their reason, and
the lost worker is replaced; results keep their order; secrets stay out; close() leaves nothing.

The reward is ``reward_fns:behave`` (tests/unit/reward_fns.py), found through the test process's
sys.path, which the workers get too.
"""

from __future__ import annotations

import asyncio

import psutil
import pytest
from reward_fns import SECRET_VAR, behave

from areal_like.config import ConfigError, TaskConfig
from areal_like.metrics import Metrics
from areal_like.tasks import Example
from rollout_server.reward_pool import RewardPool, check_reward_fn, scrubbed_env

EXAMPLE = Example("What is 1+1?", "2")
PATH = "reward_fns:behave"


@pytest.fixture
def make_pool():
    pools = []

    def make(default_path: str = PATH, metrics: Metrics | None = None, **task) -> RewardPool:
        task = {"reward_timeout_s": 2.0, "reward_workers": 2, **task}
        pools.append(RewardPool(TaskConfig(**task), default_path, metrics=metrics))
        return pools[-1]

    yield make
    for pool in pools:
        pool.close()


def score(pool: RewardPool, *responses: str, example=EXAMPLE) -> list[tuple[float, str | None]]:
    return asyncio.run(pool.score_group(example.prompt, list(responses), example))


def gone(proc: psutil.Process) -> bool:
    """Not running (a zombie awaiting its reaper counts as gone)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def failures(metrics: Metrics, kind: str) -> float:
    return metrics.registry.get_sample_value("areal_rollout_reward_failures_total", {"kind": kind}) or 0.0


def test_group_results_keep_the_order_of_the_responses(make_pool):
    pool = make_pool()
    # the first samples finish last; each must still land at its own position
    got = score(pool, "sleep 0.4 0", "sleep 0.3 1", "sleep 0.2 2", "sleep 0.1 3", "4")
    assert got == [(0.0, None), (1.0, None), (2.0, None), (3.0, None), (4.0, None)]


def test_a_groups_samples_run_in_parallel_across_workers(make_pool, tmp_path):
    pool = make_pool(reward_workers=3)
    # each sample waits until 3 workers have arrived: one at a time, the first would time out
    assert score(pool, *[f"rendezvous {tmp_path} 3"] * 3) == [(3.0, None)] * 3


def test_a_crashing_reward_scores_zero_and_keeps_its_worker(make_pool):
    metrics = Metrics()
    pool = make_pool(metrics=metrics, reward_workers=1)
    before = pool.worker_pids
    assert score(pool, "crash", "1.5") == [(0.0, "ZeroDivisionError: division by zero on purpose"), (1.5, None)]
    assert pool.worker_pids == before
    assert failures(metrics, "error") == 1
    assert metrics.registry.get_sample_value("areal_rollout_reward_seconds_count") == 2


def test_a_hanging_reward_is_killed_at_the_timeout_and_replaced(make_pool):
    metrics = Metrics()
    pool = make_pool(metrics=metrics, reward_timeout_s=1.0, reward_workers=2)
    before = {pid: psutil.Process(pid) for pid in pool.worker_pids}
    assert score(pool, "hang", "5") == [(0.0, "timeout after 1.0s"), (5.0, None)]
    after = pool.worker_pids
    lost = [proc for pid, proc in before.items() if pid not in after]
    assert len(lost) == 1 and gone(lost[0])  # the hung worker, killed by PID
    assert len(set(before) & set(after)) == 1  # the other one was left alone
    assert score(pool, "7", "8") == [(7.0, None), (8.0, None)]
    assert failures(metrics, "timeout") == 1


def test_a_memory_hog_hits_the_limit_and_its_worker_is_replaced(make_pool):
    metrics = Metrics()
    pool = make_pool(metrics=metrics, reward_memory_mb=256, reward_workers=1)
    (old,) = [psutil.Process(pid) for pid in pool.worker_pids]
    assert score(pool, "hog") == [(0.0, "MemoryError")]
    assert gone(old) and pool.worker_pids != [old.pid]
    assert score(pool, "3") == [(3.0, None)]
    assert failures(metrics, "memory") == 1


def test_workers_run_under_their_limits(make_pool):
    pool = make_pool(reward_memory_mb=256, reward_timeout_s=2.0, reward_workers=1)
    (memory, _), (cpu_left, _) = score(pool, "memory_limit", "cpu_limit_left")
    assert memory == 256
    assert 2.0 < cpu_left < 10_000  # set (the default is unlimited), and past the timeout


def test_a_reward_that_exits_the_process_is_scored_and_replaced(make_pool):
    metrics = Metrics()
    pool = make_pool(metrics=metrics, reward_workers=1)
    (old,) = [psutil.Process(pid) for pid in pool.worker_pids]
    assert score(pool, "exit") == [(0.0, "worker died: exit code 3")]
    assert gone(old) and score(pool, "pid") == [(float(pool.worker_pids[0]), None)]
    assert pool.worker_pids != [old.pid]
    assert failures(metrics, "died") == 1


def test_values_that_are_not_finite_numbers_score_zero(make_pool):
    pool = make_pool()
    assert score(pool, "nan", "text", "-2") == [
        (0.0, "reward is not finite: nan"), (0.0, "reward is not a number: '1.0'"), (-2.0, None)]


def test_workers_do_not_see_secrets(make_pool, monkeypatch):
    monkeypatch.setenv(SECRET_VAR, "s3cret")
    monkeypatch.setenv("HF_TOKEN", "hf_s3cret")
    assert behave("secret", EXAMPLE) == 1.0  # the check sees the secret where it is set
    pool = make_pool()
    assert score(pool, "secret", "secret") == [(0.0, None), (0.0, None)]
    env = scrubbed_env({"WANDB_API_KEY": "k", "HF_TOKEN": "t", "AWS_SECRET_ACCESS_KEY": "s", "PGPASSWORD": "p",
                        "GITHUB_TOKEN": "g", "PATH": "/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": "/repo"})
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": "/repo"}


def test_the_math_reward_runs_in_workers(make_pool):
    pool = make_pool("rollout_server.rewards:math_reward", reward_timeout_s=30.0)
    example = Example("Simplify sqrt(8).", r"2\sqrt{2}")
    assert score(pool, r"so \boxed{2\sqrt{2}}", r"\boxed{\sqrt{8}}", "3", example=example) == [
        (1.0, None), (1.0, None), (0.0, None)]


def test_task_reward_fn_overrides_the_default_path(make_pool):
    pool = make_pool("rollout_server.rewards:math_reward", reward_fn=PATH)
    assert pool.path == PATH and score(pool, "0.25") == [(0.25, None)]


def test_close_leaves_no_process_behind(make_pool, wait_until):
    pool = make_pool(reward_timeout_s=30.0)
    grandchild = psutil.Process(int(score(pool, "child")[0][0]))  # a worker's own child, still running
    workers = [psutil.Process(pid) for pid in pool.worker_pids]

    async def close_while_one_hangs():
        hung = asyncio.ensure_future(pool.score(EXAMPLE.prompt, "hang", EXAMPLE))
        await asyncio.sleep(0.2)  # let it reach a worker (if it does not, it is scored all the same)
        pool.close()
        return await hung

    reward, reason = asyncio.run(close_while_one_hangs())
    assert reward == 0.0 and reason is not None
    assert all(gone(p) for p in workers)  # killed and reaped by close()
    wait_until(lambda: gone(grandchild), timeout_s=10, what="the worker's child to die of its SIGKILL")
    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    assert not mine & {p.pid for p in [*workers, grandchild]}
    with pytest.raises(RuntimeError, match="closed"):
        score(pool, "1")


@pytest.mark.parametrize("path,why", [
    ("nope.module:fn", "ModuleNotFoundError"),
    ("reward_fns:missing", "AttributeError"),
    ("reward_fns:NOT_CALLABLE", "not a callable"),
    ("no_separator", "not 'pkg.module:function'"),
])
def test_a_reward_path_that_cannot_be_used_is_a_config_error(path, why, make_pool):
    with pytest.raises(ConfigError, match=rf"task\.reward_fn='{path}'.*{why}"):
        check_reward_fn(path)
    with pytest.raises(ConfigError, match=why):
        make_pool(path)
    check_reward_fn(PATH)
    check_reward_fn("rollout_server.reward_pool.check_reward_fn")  # the dotted form also works
