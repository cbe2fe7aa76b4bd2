"""RewardPool with real workers (and in-process): faults contained, order kept, secrets out."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import socket
import sys
import threading

import psutil
import pytest
from reward_fns import SECRET_VAR, behave

from areal_like.daemon import ComponentStopped
from areal_like.net.metrics import Metrics
from areal_like.settings.config import TaskConfig, load_config
from areal_like.tasks.task import Example
from rollout_server.reward_pool import WARN_EVERY_S, RewardPool, RewardPoolError, scrubbed_env
from rollout_server.server import RolloutServer

EXAMPLE = Example("What is 1+1?", "2")
PATH = "reward_fns:behave"


@pytest.fixture
def make_pool():
    pools = []

    def make(default_path: str = PATH, metrics: Metrics | None = None, processes: int = 0,
             **task) -> RewardPool:
        task = {"reward_timeout_s": 2.0, "reward_workers": 2, **task}
        pools.append(RewardPool(TaskConfig(**task), default_path, metrics=metrics,
                                processes=processes))
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
    return metrics.registry.get_sample_value("areal_rollout_reward_failures_total",
                                             {"kind": kind}) or 0.0


def test_group_results_keep_the_order_and_values_not_finite_numbers_score_zero(make_pool):
    pool = make_pool()
    # the first samples finish last; each must still land at its own position
    got = score(pool, "sleep 0.4 0", "sleep 0.3 1", "sleep 0.2 2", "sleep 0.1 3", "4", "nan",
                "text", "-2", "huge")
    assert got[:8] == [(0.0, None), (1.0, None), (2.0, None), (3.0, None), (4.0, None),
                       (0.0, "reward is not finite: nan"), (0.0, "reward is not a number: '1.0'"),
                       (-2.0, None)]
    # an int past a double's range crosses as JSON, then cannot be a float
    assert got[8][0] == 0.0 and got[8][1].startswith("reward is not finite: 1000")


def test_a_groups_samples_run_in_parallel_across_workers(make_pool):
    # each sample waits until 3 workers have connected: one at a time, the first would time out
    pool = make_pool(reward_workers=3, worker_network=True)  # root's workers: loopback kept
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(30)

        def answer_all_three():
            conns = [server.accept()[0] for _ in range(3)]
            for conn in conns:
                with conn:
                    conn.sendall(b"3")

        meeting = threading.Thread(target=answer_all_three, daemon=True)
        meeting.start()
        port = server.getsockname()[1]
        assert score(pool, *[f"rendezvous {port}"] * 3) == [(3.0, None)] * 3
        meeting.join(timeout=30)


def test_a_raising_reward_scores_zero_and_keeps_its_worker(make_pool):
    metrics = Metrics()
    pool = make_pool(metrics=metrics, reward_workers=1)
    before = pool.worker_pids
    assert score(pool, "crash", "bad_error", "1.5") == [
        (0.0, "ZeroDivisionError: division by zero on purpose"),
        (0.0, "BadError (its message raised)"), (1.5, None)]  # bad_error's __str__ raises
    assert pool.worker_pids == before
    assert failures(metrics, "error") == 2
    assert metrics.registry.get_sample_value("areal_rollout_reward_seconds_count") == 3


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


def test_samples_after_a_lost_worker_are_scored_by_its_replacement(make_pool):
    metrics = Metrics()
    pool = make_pool(metrics=metrics, reward_timeout_s=1.0, reward_memory_mb=256,
                     reward_workers=1)
    (first,) = [psutil.Process(pid) for pid in pool.worker_pids]
    assert score(pool, "1", "hang", "3", "exit", "5", "hog", "7") == [
        (1.0, None), (0.0, "timeout after 1.0s"), (3.0, None), (0.0, "worker died: exit code 3"),
        (5.0, None), (0.0, "MemoryError"), (7.0, None)]
    assert gone(first) and pool.worker_pids != [first.pid]
    assert metrics.registry.get_sample_value("areal_rollout_reward_seconds_count") == 7
    assert [failures(metrics, k) for k in ("timeout", "died", "memory")] == [1, 1, 1]


def test_one_worker_scores_shares_bigger_than_a_socket_buffer_and_times_each_sample(make_pool):
    pool = make_pool(reward_timeout_s=3.0, reward_workers=1)
    responses = ["long " + "x" * (300_000 + k) for k in range(8)]
    assert score(pool, *responses) == [(float(len(r)), None) for r in responses]
    # each queued sample's timeout runs from the answer before it, not from the send
    assert score(pool, "sleep 2 1", "sleep 2 2") == [(1.0, None), (2.0, None)]


def test_workers_run_under_their_limits(make_pool):
    pool = make_pool(reward_memory_mb=256, reward_timeout_s=2.0, reward_workers=1)
    (memory, _), (cpu_left, _) = score(pool, "memory_limit", "cpu_limit_left")
    assert memory == 256
    assert 2.0 < cpu_left < 10_000  # set (the default is unlimited), and past the timeout


@pytest.mark.parametrize("response", ["reply 2000000", "forged_frame"])
def test_a_reply_past_the_limit_is_refused_and_the_next_samples_are_scored(make_pool, response):
    metrics = Metrics()
    pool = make_pool(metrics=metrics, reward_workers=1, worker_reply_mb=1)
    (old,) = [psutil.Process(pid) for pid in pool.worker_pids]
    (reward, why), *rest = score(pool, response, "1", "2")
    assert reward == 0.0 and why.startswith("a reply of ") and why.endswith(
        "bytes was refused: past the 1048576 bytes a worker may send (task.worker_reply_mb)")
    assert rest == [(1.0, None), (2.0, None)]  # by a fresh worker
    assert gone(old) and pool.worker_pids != [old.pid]
    assert failures(metrics, "oversize") == 1


def test_workers_do_not_see_secrets(make_pool, monkeypatch):
    monkeypatch.setenv(SECRET_VAR, "s3cret")
    monkeypatch.setenv("HF_TOKEN", "hf_s3cret")
    assert behave("secret", EXAMPLE) == 1.0  # the check sees the secret where it is set
    pool = make_pool()
    assert score(pool, "secret", "secret") == [(0.0, None), (0.0, None)]
    env = scrubbed_env({"WANDB_API_KEY": "k", "HF_TOKEN": "t", "AWS_SECRET_ACCESS_KEY": "s",
                        "PGPASSWORD": "p", "GITHUB_TOKEN": "g", "PATH": "/bin",
                        "OMP_NUM_THREADS": "1", "PYTHONPATH": "/repo"})
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": "/repo"}


def test_the_default_reward_runs_in_workers_unless_task_reward_fn_overrides_it(make_pool):
    pool = make_pool("areal_like.tasks.rewards:math_reward", reward_timeout_s=30.0)
    example = Example("Simplify sqrt(8).", r"2\sqrt{2}")
    assert score(pool, r"so \boxed{2\sqrt{2}}", r"\boxed{\sqrt{8}}", "3", example=example) == [
        (1.0, None), (1.0, None), (0.0, None)]
    pool = make_pool("areal_like.tasks.rewards:math_reward", reward_fn=PATH)
    assert pool.path == PATH and score(pool, "0.25") == [(0.25, None)]


def test_close_leaves_no_process_behind(make_pool, wait_until):
    pool = make_pool(reward_timeout_s=30.0, processes=1)  # a reward may start one process here
    # a worker's own child, still running (found among the worker's descendants here)
    score(pool, "child")
    workers = [psutil.Process(pid) for pid in pool.worker_pids]
    started = [p for w in workers for p in w.children(recursive=True)]
    (grandchild,) = [p for p in started if p.name() == "sleep"]

    async def close_while_one_hangs():
        hung = asyncio.ensure_future(pool.score(EXAMPLE.prompt, "hang", EXAMPLE))
        # let it reach a worker (if it does not, it is scored all the same)
        await asyncio.sleep(0.2)
        pool.close()
        return await hung

    reward, reason = asyncio.run(close_while_one_hangs())
    assert reward == 0.0 and reason is not None
    assert all(gone(p) for p in workers)  # killed and reaped by close()
    wait_until(lambda: gone(grandchild), timeout_s=10,
               what="the worker's child to die of its SIGKILL")
    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    assert not mine & {p.pid for p in [*workers, grandchild]}
    with pytest.raises(RuntimeError, match="closed"):
        score(pool, "1")


def all_gone(procs: list[psutil.Process]) -> bool:
    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    return all(gone(p) for p in procs) and not mine & {p.pid for p in procs}


@pytest.mark.parametrize("path,why", [
    ("nope.module:fn", "ModuleNotFoundError: No module named 'nope'"),
    ("reward_fns:missing", "AttributeError: module 'reward_fns' has no attribute 'missing'"),
    ("reward_fns:NOT_CALLABLE", "TypeError: NOT_CALLABLE in reward_fns is a int, not a callable"),
    ("no_separator", "ValueError: 'no_separator' is not of the form package.module:function"),
])
def test_a_reward_that_cannot_be_loaded_is_fatal_at_the_first_score(path, why, make_pool):
    pool = make_pool(reward_fn=path)
    workers = [psutil.Process(pid) for pid in pool.worker_pids]
    with pytest.raises(RewardPoolError) as e:
        score(pool, "1", "2", "3")
    assert str(e.value) == f"task.reward_fn={path!r} cannot be loaded in a reward worker: {why}"
    assert all_gone(workers)  # every worker, not only the one that said why
    # and it stays broken: no new worker
    with pytest.raises(RewardPoolError, match="cannot be loaded"):
        score(pool, "1")
    assert [p.pid for p in workers] == pool.worker_pids and all_gone(workers)


def test_the_tasks_own_reward_is_named_when_it_cannot_be_loaded(make_pool):
    with pytest.raises(RewardPoolError, match=r"^the task's reward 'nope\.module:fn' cannot be "
                                              r"loaded in a reward worker: ModuleNotFoundError"):
        score(make_pool("nope.module:fn"), "1")


# module source -> why its import fails in a worker (without the secret), though it imports here
WORKER_ONLY_FAILURES = {
    "exits_at_import": ("import os\nif 'AREAL_TEST_API_TOKEN' not in os.environ:\n"
                        "    os._exit(4)\n", "worker died: exit code 4"),  # before it is ready
    "needs_secret": ("import os\nif 'AREAL_TEST_API_TOKEN' not in os.environ:\n"
                     "    raise RuntimeError('AREAL_TEST_API_TOKEN is not set')\n",
                     "RuntimeError: AREAL_TEST_API_TOKEN is not set"),
    "big_at_import": ("BLOCK = bytearray(300 * 2**20)\n",
                      "MemoryError (task.reward_memory_mb=256 limits the address space)"),
}


@pytest.mark.parametrize("module", sorted(WORKER_ONLY_FAILURES))
def test_a_reward_that_imports_here_but_not_in_a_worker_is_fatal(
        module, make_pool, tmp_path, monkeypatch):
    source, why = WORKER_ONLY_FAILURES[module]
    (tmp_path / f"{module}.py").write_text(source + "def score(response, example):\n"
                                           "    return 1.0\n")
    tmp_path.chmod(0o755)  # root's workers run as a uid of their own
    monkeypatch.syspath_prepend(str(tmp_path))  # the workers get this process's sys.path
    monkeypatch.setenv(SECRET_VAR, "s3cret")  # scrubbed from the workers' environment
    assert importlib.import_module(module).score("", EXAMPLE) == 1.0  # fine in this process
    del sys.modules[module]  # (and its memory)
    pool = make_pool(reward_fn=f"{module}:score", reward_memory_mb=256)
    workers = [psutil.Process(pid) for pid in pool.worker_pids]
    with pytest.raises(RewardPoolError) as e:
        score(pool, "1")
    assert str(e.value) == (f"task.reward_fn='{module}:score' cannot be loaded in a reward worker: "
                            f"{why}")
    assert all_gone(workers)
    assert module not in sys.modules  # the pool never imports the reward in its own process


def test_failures_are_logged_at_most_once_a_minute_per_kind(make_pool, caplog):
    metrics = Metrics()
    pool = make_pool(metrics=metrics, reward_workers=1, reward_fn=PATH)
    now = [1000.0]
    pool.warnings.clock = lambda: now[0]
    caplog.set_level(logging.WARNING, logger="rollout_server.reward_pool")

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "rollout_server.reward_pool"]

    assert (score(pool, *["crash"] * 5)
            == [(0.0, "ZeroDivisionError: division by zero on purpose")] * 5)
    assert warnings() == [f"task.reward_fn={PATH!r}: 1 sample(s) scored 0, reward failure (error): "
                          "ZeroDivisionError: division by zero on purpose"]
    now[0] += WARN_EVERY_S / 2
    assert score(pool, "exit", "crash") == [(0.0, "worker died: exit code 3"),
                                            (0.0, "ZeroDivisionError: division by zero on purpose")]
    # a new kind: logged
    assert len(warnings()) == 2 and "(died): worker died: exit code 3" in warnings()[1]
    now[0] += WARN_EVERY_S / 2
    assert score(pool, "nan") == [(0.0, "reward is not finite: nan")]
    # a minute after the first: the latest reason, and how many were not logged
    assert len(warnings()) == 3
    assert (f"(error): reward is not finite: nan (5 more since the last such line; logged at most "
            f"every {WARN_EVERY_S:.0f}s)") in warnings()[2]
    assert failures(metrics, "error") == 7 and failures(metrics, "died") == 1


def test_a_reward_that_cannot_be_loaded_stops_the_rollout_server_at_once():
    server = RolloutServer.from_run(load_config([]))

    async def episode(error: Exception) -> None:
        raise error

    # an episode task ends with `error`, as in serve_until_stopped
    async def finish(error: Exception) -> None:
        server.wake = asyncio.Event()
        task = asyncio.create_task(episode(error))
        await asyncio.gather(task, return_exceptions=True)
        server._episode_done(task)

    asyncio.run(finish(RuntimeError("engine hiccup")))
    # an episode may fail now and then
    assert server.failure is None and server.episode_failures == 1
    asyncio.run(finish(RewardPoolError("task.reward_fn='x:y' cannot be loaded in a reward "
                                       "worker: ValueError: v")))
    assert isinstance(server.failure, ComponentStopped)
    assert str(server.failure) == ("task.reward_fn='x:y' cannot be loaded in a reward worker: "
                                   "ValueError: v")


def test_reward_workers_0_scores_in_this_process_by_the_same_rules(make_pool, caplog):
    metrics = Metrics()
    with caplog.at_level(logging.WARNING, logger="rollout_server.reward_pool"):
        pool = make_pool(metrics=metrics, reward_workers=0, reward_timeout_s=0.01)
    assert pool.worker_pids == [] and caplog.text.count("no sandbox") == 1  # said at start
    got = score(pool, "1.5", "crash", "nan", "text", "pid", "sys_exit", "huge", "sleep 0.05 2",
                "bad_error")
    assert got[:6] == [(1.5, None), (0.0, "ZeroDivisionError: division by zero on purpose"),
                       (0.0, "reward is not finite: nan"), (0.0, "reward is not a number: '1.0'"),
                       # an exit() is the sample's, not the server's
                       (float(os.getpid()), None), (0.0, "SystemExit: 3")]
    assert (got[6][0] == 0.0 and got[6][1].startswith("reward is not finite: 1000")
            and got[7] == (2.0, None) and got[8] == (0.0, "BadError (its message raised)"))
    assert failures(metrics, "error") == 6
    assert metrics.registry.get_sample_value("areal_rollout_reward_seconds_count") == 9
    assert "does not enforce" in caplog.text  # the slow sample is logged (its time is not bounded)
    with pytest.raises(RewardPoolError, match=r"^task.reward_fn='nope\.module:fn' "
                                              r"cannot be loaded: ModuleNotFoundError"):
        # at start, as a worker's failed import is
        make_pool(reward_workers=0, reward_fn="nope.module:fn")


def test_a_group_the_wire_cannot_carry_fails_its_episode_not_the_sender():
    import numpy as np

    from areal_like.net.metrics import Metrics
    from areal_like.wire.protocol import TrajectoryGroup
    from areal_like.wire.trajectory import Trajectory, as_f32, as_i32
    from rollout_server.buffer_link import BufferLink

    server = RolloutServer.from_run(load_config([]))
    # the sender's queue: groups are encoded once as they join it (no connection needed here)
    server.link = BufferLink(None, None, "s", Metrics(), free_slots=lambda: 0,
                             blocked=lambda: False, start=lambda credit: None)

    def group(meta: dict) -> TrajectoryGroup:
        t = Trajectory.of(prompt_ids=as_i32([1, 2]), output_ids=as_i32([3]),
                          behav_logp=as_f32([-0.5]),
                          versions=as_i32([0]), reward=1.0, finish_reason="stop", metadata=meta)
        return TrajectoryGroup(group_id="g", server_id="s", lease_id="l", prompt_index=0, epoch=0,
                               trajectories=[t])

    async def finish(result: TrajectoryGroup) -> None:
        server.wake = asyncio.Event()

        async def episode() -> TrajectoryGroup:
            return result

        task = asyncio.create_task(episode())
        await asyncio.gather(task)
        server._episode_done(task)

    asyncio.run(finish(group({"score": np.float32(0.5)})))
    assert server.episode_failures == 1 and not server.link.unacked and server.failure is None
    asyncio.run(finish(group({"score": 0.5})))
    assert server.episode_failures == 0 and list(server.link.unacked) == ["g"]
