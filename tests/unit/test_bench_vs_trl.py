"""The pure pieces of benchmarks/bench_vs_trl.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_vs_trl.py"
_spec = importlib.util.spec_from_file_location("bench_vs_trl", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("fn, completions, answers, want", [
    ("exact_match_rewards", ["82", " 82 ", "8", "820", ""], ["82"] * 4 + ["0"],
     [1.0, 1.0, 0.0, 0.0, 0.0]),
    ("math_rewards", ["82", "The answer is 82.", "$82$", "83", ""], ["82"] * 5,
     [1.0, 1.0, 1.0, 0.0, 0.0]),  # the project's math-verify reward
])
def test_a_trl_reward_scores_each_completion_and_refuses_mismatched_columns(fn, completions,
                                                                            answers, want):
    reward = getattr(bench, fn)
    # TRL passes the dataset's `answer` column by name, one entry per completion
    got = reward(completions, answer=answers, prompts=["37+45="] * 5, completion_ids=[[]] * 5)
    assert got == want
    with pytest.raises(ValueError):
        reward(["1", "2"], answer=["1"])


def test_throughput_from_budget_start_to_last_step_end_and_its_refusals():
    recs = [{"time": 102.0, "seqs": 64}, {"time": 103.0, "seqs": 64}, {"time": 106.0, "seqs": 32}]
    sps, samples, seconds = bench.rl_throughput(recs, start=100.0)
    assert (samples, seconds) == (160, 6.0)
    assert sps == pytest.approx(160 / 6.0)
    with pytest.raises(ValueError, match="no trainer step"):
        bench.rl_throughput([], start=0.0)
    with pytest.raises(ValueError, match="after the start"):
        bench.rl_throughput([{"time": 5.0, "seqs": 64}], start=5.0)


def test_the_budget_starts_after_the_steps_that_may_train_groups_made_during_start_up():
    """Groups made during start-up give the first eta + 1 steps a head start: the clock starts
    at the end of step eta + 1."""
    rows = [{"time": 1.0, "event": "resume"},
            {"time": 2.5, "event": "logprob_guard", "passed": True},
            *({"time": 3.0 + k, "step": k, "seqs": 64, "reward_mean": 0.5} for k in range(1, 7))]
    assert bench.rl_start(rows, eta=0) == 4.0 and bench.rl_start(rows, eta=4) == 8.0
    assert [r["step"] for r in bench.counted_steps(rows, eta=0)] == [2, 3, 4, 5, 6]
    assert [r["step"] for r in bench.counted_steps(rows, eta=4)] == [6]
    assert bench.rl_start(rows[:3], eta=1) is None  # one step recorded: the budget has not started
    counted, start = bench.counted_steps(rows, 0), bench.rl_start(rows, 0)
    assert bench.rl_throughput(counted, start)[1:] == (320, 5.0)


def test_the_workload_is_the_issues_and_starts_from_the_stronger_warm_start(tmp_path):
    cfg = bench.workload(tmp_path / "run", eta=4)
    t = cfg.task
    assert ((t.name, t.digits, t.group_size, t.max_new_tokens, t.temperature)
            == ("addition", 2, 8, 8, 1.0))
    assert (cfg.buffer.groups_per_step, cfg.trainer.lr, cfg.buffer.max_staleness) == (8, 3e-5, 4)
    # 350 supervised steps at lr 1e-3: greedy held-out ~0.27 (1500 at 3e-3 stalled at ~0.07)
    assert (cfg.warm_start.steps, cfg.warm_start.lr, cfg.warm_start.batch_size) == (350, 1e-3, 64)
    assert cfg.launch.num_rollout_servers is None and cfg.model.hidden_size == 128  # from the cores


def test_the_users_rows_are_every_2_digit_addition_split_once_into_disjoint_train_and_eval():
    train, held = bench.addition_rows()
    assert (len(train), len(held)) == (90 * 90 - bench.USER_EVAL_ROWS, bench.USER_EVAL_ROWS)
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in held)
    assert all(int(r["answer"]) == sum(map(int, r["prompt"][:-1].split("+"))) for r in train + held)
    assert bench.addition_rows() == (train, held) and bench.addition_rows(seed=1)[1] != held


def test_the_users_path_takes_layout_micro_batch_reward_placement_and_eta_from_defaults(tmp_path):
    """Issue 41: no override of layout, micro-batch, reward placement or eta on our side."""
    banned = ("launch.", "trainer.micro_batch_size", "trainer.max_tokens_per_micro_batch",
              "task.reward_workers", "buffer.max_staleness", "topology")
    assert not [s for s in bench.USER_SETTINGS if s.startswith(banned)]
    data = (tmp_path / "model", tmp_path / "train.jsonl", tmp_path / "eval.jsonl")
    ours = bench.user_run(tmp_path / "run", str(tmp_path / "warm"), data)
    plain = bench.load_config(["model=local_hf", f"model.path={tmp_path}", "task=jsonl_math",
                               f"task.dataset_path={data[1]}"])
    for part, keys in (("trainer", ("micro_batch_size", "max_tokens_per_micro_batch")),
                       ("task", ("reward_workers",)), ("buffer", ("max_staleness",)),
                       ("launch", ("num_rollout_servers", "trainer_ranks", "pin_cpus"))):
        for key in keys:
            got, default = (getattr(getattr(c, part), key) for c in (ours, plain))
            assert got == default, f"{part}.{key}"
    assert (ours.task.name, ours.model.path) == ("dataset", str(tmp_path / "warm"))


def test_medians_over_runs():
    pairs = ((30.0, 0.5), (10.0, 0.7), (20.0, 0.6))
    runs = [{"samples_per_s": s, "accuracy": {"greedy": g}} for s, g in pairs]
    assert (bench.median_of(runs, "samples_per_s"), bench.median_of(runs, "greedy")) == (20.0, 0.6)
