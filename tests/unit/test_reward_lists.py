"""A list of reward functions with weights, in workers and in process: TRL's batched rewards
called once per group, per-sample ones per sample; the weighted sum and each one's rewards by name;
bad batched results; the preflight's probe against the dataset's columns (trl_reward_fns.py)."""

from __future__ import annotations

import asyncio

import pytest

from areal_like.net.metrics import Metrics
from areal_like.settings.config import TaskConfig
from areal_like.tasks.task import Example
from rollout_server.episode import observe_terms
from rollout_server.reward_pool import RewardPool, load_problem

CHAT = Example("12+34=", "46", ({"role": "user", "content": "12+34="},), {"source": "hand"})
PLAIN = Example("12+34=", "46", None, {"source": "hand"})
M = "trl_reward_fns"


@pytest.fixture
def make_pool():
    pools = []

    def make(reward_fn, metrics: Metrics | None = None, **task) -> RewardPool:
        task = {"reward_timeout_s": 5.0, "reward_workers": 2, **task}
        pools.append(RewardPool(TaskConfig(reward_fn=reward_fn, **task), "unused:default",
                                metrics=metrics))
        return pools[-1]

    yield make
    for pool in pools:
        pool.close()


def terms(pool: RewardPool, *responses: str, example=CHAT):
    return asyncio.run(pool.score_terms(example.prompt, list(responses), example))


@pytest.mark.parametrize("workers", [2, 0], ids=["workers", "in_process"])
@pytest.mark.parametrize("example", [CHAT, PLAIN], ids=["conversational", "standard"])
def test_a_batched_and_a_per_sample_reward_are_weighted_and_each_reported(workers, example,
                                                                          make_pool):
    pool = make_pool([f"{M}:length_parity", f"{M}:exact", f"{M}:says_answer"],
                     reward_weights=[0.5, 2.0, 1.0], reward_workers=workers)
    scores, by_fn = terms(pool, "46", "461", "7", "46 ", example=example)
    # length_parity is -10 wherever TRL's shapes were not what it got
    assert by_fn == {"length_parity": [0.0, 1.0, 1.0, 1.0], "exact": [1.0, 0.0, 0.0, 1.0],
                     "says_answer": [1.0, 1.0, 0.0, 1.0]}
    assert scores == [(3.0, None), (1.5, None), (0.5, None), (3.5, None)]


def test_a_batched_result_of_the_wrong_length_scores_zero_naming_the_counts(make_pool):
    pool = make_pool([f"{M}:one_short", f"{M}:exact"])
    scores, by_fn = terms(pool, "46", "x", "46")
    why = (f"a batched reward returns one number per completion: {M}:one_short returned 2 "
           "rewards for 3 completions")
    assert scores == [(1.0, f"one_short: {why}"), (0.0, f"one_short: {why}"),
                      (1.0, f"one_short: {why}")]
    assert by_fn == {"one_short": [0.0] * 3, "exact": [1.0, 0.0, 1.0]}


@pytest.mark.parametrize("workers", [2, 0], ids=["workers", "in_process"])
def test_none_is_not_scored_and_an_array_is_read(workers, make_pool):
    pool = make_pool([f"{M}:none_for_odd", f"{M}:as_array"], reward_weights=[1.0, 0.1],
                     reward_workers=workers)
    scores, by_fn = terms(pool, "ab", "abc")
    assert by_fn == {"none_for_odd": [1.0, None], "as_array": [2.0, 3.0]}
    assert scores == [(pytest.approx(1.2), None), (pytest.approx(0.3), None)]
    metrics = Metrics()
    observe_terms(metrics, by_fn)
    mean = {fn: metrics.registry.get_sample_value("areal_rollout_reward_fn_mean", {"fn": fn})
            for fn in by_fn}
    assert mean == {"none_for_odd": 1.0, "as_array": 2.5}  # a None is left out of the mean


def test_functions_that_share_a_name_are_told_apart_by_their_path(make_pool):
    pool = make_pool([f"{M}:exact", f"tests.unit.{M}:exact"], reward_workers=0)
    assert list(terms(pool, "46")[1]) == [f"{M}:exact", f"tests.unit.{M}:exact"]


def test_the_tasks_own_reward_reports_no_terms(make_pool):
    pool = RewardPool(TaskConfig(reward_workers=0), f"{M}:exact")
    try:
        assert terms(pool, "46") == ([(1.0, None)], {})
    finally:
        pool.close()


def test_the_probe_checks_a_batched_reward_against_the_columns():
    # the probe imports from the working directory (the repository's root here), as workers do
    m = f"tests.unit.{M}"
    cfg = TaskConfig(reward_fn=[f"{m}:exact", f"{m}:needs_solution"])
    assert load_problem(cfg, ["answer", "source"]) == (
        f"task.reward_fn='{m}:needs_solution' cannot be loaded in a reward worker: it is a "
        "batched reward (it has a completions parameter) and cannot be called with prompts, "
        "completions and the dataset's columns (answer, source): TypeError: missing a required "
        "argument: 'solution'")
    assert load_problem(cfg, ["answer", "solution"]) is None
    assert load_problem(TaskConfig(reward_fn=f"{m}:says_answer"), ["answer", "source"]) is None
