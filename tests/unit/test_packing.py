"""Packed micro-batches, token budgets and balanced ranks (trainer/packing.py, step.py)."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from areal_like.settings.config import ConfigError, load_config
from areal_like.wire.protocol import TrajectoryGroup
from areal_like.wire.trajectory import Trajectory
from trainer.data import groups_to_batch
from trainer.packing import balance_ranks, plan_minibatch, split_microbatches
from trainer.step import StepSettings, layout_stats, plan

LENS = [9, 7, 6, 5, 4, 2]  # rows 0..5


def test_ranks_are_balanced_longest_first():
    # 9 -> r0 (0 vs 0: lower rank), 7 -> r1, 6 -> r1 (7 < 9; 13), 5 -> r0 (9 < 13; 14),
    # 4 -> r1 (13 < 14; 17), 2 -> r0 (14 < 17; 16): 16 vs 17 tokens (round-robin gave 20 vs 13)
    parts = balance_ranks(torch.arange(6), torch.tensor(LENS), 2)
    assert parts == [[0, 3, 5], [1, 2, 4]]
    assert balance_ranks(torch.arange(6), torch.tensor(LENS), 1) == [[0, 1, 2, 3, 4, 5]]


def test_token_budget_is_first_fit_decreasing_then_evened_when_packed():
    lens = dict(enumerate(LENS))
    # packed, budget 12: first fit 9 -> A; 7 -> B (16 > 12); 6 -> C; 5 -> B (12); 4 -> C (10);
    # 2 -> A (11): 3 calls, the largest 12. Evened longest-first over 3 calls: 9 -> A, 7 -> B,
    # 6 -> C, 5 -> C (11), 4 -> B (11), 2 -> A (11): the same count, the largest 11
    assert split_microbatches(list(range(6)), lens, max_seqs=1, max_tokens=12,
                              packed=True) == [[0, 5], [1, 4], [2, 3]]
    # one call more where evening out over as many would break the budget: 6, 6, 4, 4, 4 under
    # 12 fit in 2 calls as [6, 6] [4, 4, 4] (the largest 12); longest-first over 2 gives
    # [6, 4, 4] (14 > 12); over 3: 6 -> A, 6 -> B, 4 -> C, 4 -> C (8), 4 -> A (10)
    assert split_microbatches(list(range(5)), dict(enumerate([6, 6, 4, 4, 4])), max_seqs=1,
                              max_tokens=12, packed=True) == [[0, 4], [1], [2, 3]]
    # a sequence over the budget runs alone and does not stop the others being evened:
    # 20 | 5 5 | 3 3 -> first fit [20] [5, 5] [3, 3]; evened [20] [5, 3] [5, 3]
    assert split_microbatches(list(range(5)), dict(enumerate([20, 5, 5, 3, 3])), max_seqs=1,
                              max_tokens=10, packed=True) == [[0], [1, 3], [2, 4]]
    # padded, budget 12, cost = count x longest: 9 -> A; 7 -> B (A: 18); 6 -> C (B: 14);
    # 5 -> C (2 x 6 = 12); 4 -> D (A 18, B 14, C 18); 2 -> D (2 x 4 = 8)
    assert split_microbatches(list(range(6)), lens, max_seqs=1, max_tokens=12,
                              packed=False) == [[0], [1], [2, 3], [4, 5]]
    # a sequence longer than the budget runs alone; no budget: runs of max_seqs
    assert split_microbatches([0, 1], {0: 20, 1: 3}, max_seqs=8, max_tokens=12,
                              packed=True) == [[0], [1]]
    assert split_microbatches(list(range(6)), lens, max_seqs=4, max_tokens=0,
                              packed=True) == [[0, 1, 2, 3], [4, 5]]


def test_packed_calls_keep_the_budget_and_every_row_once():
    rng = random.Random(0)
    for _ in range(2000):
        lens = dict(enumerate(sorted((rng.randint(1, 40) for _ in range(rng.randint(1, 16))),
                                     reverse=True)))
        budget = rng.randint(10, 80)
        calls = split_microbatches(list(lens), lens, max_seqs=1, max_tokens=budget, packed=True)
        assert sorted(r for c in calls for r in c) == list(lens)
        assert all(c and (len(c) == 1 or sum(lens[r] for r in c) <= budget) for c in calls)


def test_every_rank_runs_as_many_calls_and_the_layout_is_reported():
    # 2 ranks, packed, budget 12: r0 holds rows 0, 3, 5 (9, 5, 2) -> first fit [9, 2], [5],
    # evened [9], [5, 2]; r1 holds 1, 2, 4 (7, 6, 4) -> [7, 4], [6], evened [7], [6, 4]
    p = plan_minibatch(torch.arange(6), torch.tensor(LENS), 2, max_seqs=1, max_tokens=12,
                       packed=True)
    assert [[c.tolist() for c in cs] for cs in p.calls] == [[[0], [3, 5]], [[1], [2, 4]]]
    st = layout_stats(p)
    assert (st["seq_tokens"], st["computed_tokens"], st["micro_batches"]) == (33.0, 33.0, 4.0)
    assert st["rank_token_spread"] == pytest.approx((17 - 16) / 16.5)
    # padded, 4 per call, on 2 ranks: r0 [9, 5, 2] -> 3 x 9 = 27 computed, r1 [7, 6, 4] -> 21
    p = plan_minibatch(torch.arange(6), torch.tensor(LENS), 2, max_seqs=4, max_tokens=0,
                       packed=False)
    assert layout_stats(p)["computed_tokens"] == 48.0
    # one sequence, two ranks: rank 1 runs one zero-weight call
    p = plan_minibatch(torch.tensor([3]), torch.tensor(LENS), 2, max_seqs=4, max_tokens=0,
                       packed=True)
    assert p.calls[0][0].tolist() == [3] and p.calls[1] == [None]


def test_bad_budget_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"trainer\.max_tokens_per_micro_batch"):
        load_config(["trainer.max_tokens_per_micro_batch=-1"])
    assert load_config([]).trainer.max_tokens_per_micro_batch == 0  # off unless asked for


def test_a_minibatch_is_packed_only_where_padding_would_waste_the_threshold():
    # LENS in one padded call: 6 x 9 = 54 positions for 33 tokens, 39% padding -> packed;
    # lengths 9, 9, 8, 9: 36 positions for 35 tokens, 2.8% padding -> padded (the default 0.15)
    cfg = load_config(["trainer.micro_batch_size=8", "trainer.pack_sequences=true"])  # tiny pads
    s = StepSettings.from_config(cfg)
    assert s.pack_min_padding == 0.15
    spread, near = _batch([(1, n - 1) for n in LENS]), _batch([(1, n - 1) for n in (9, 9, 8, 9)])
    assert plan(spread, torch.arange(6), s).packed
    p = plan(near, torch.arange(4), s)
    assert not p.packed and p.worst_padding() == pytest.approx(1 / 36)
    assert layout_stats(p)["packed_minibatches"] == 0.0  # reported (trainer.jsonl, /metrics)
    # two per call: lengths 9, 8 -> one call wasting 1 - 17 / 18 = 6% -> padded; lengths 9, 8, 9, 3
    # -> calls [9, 9] (0%) and [8, 3] (1 - 11 / 16 = 31%): the minibatch as a whole wastes
    # 1 - 29 / 34 = 14.7%, under the threshold, but each call is checked -> packed
    two = replace(s, micro_batch_size=2)
    assert not plan(_batch([(1, 8), (1, 7)]), torch.arange(2), two).packed
    assert plan(_batch([(1, 8), (1, 7), (1, 8), (1, 2)]), torch.arange(4), two).packed
    assert plan(near, torch.arange(4), replace(s, pack_min_padding=0.0)).packed  # 0: always
    assert not plan(spread, torch.arange(6), replace(s, pack_sequences=False)).packed
    with pytest.raises(ConfigError, match=r"trainer\.pack_min_padding"):
        load_config(["trainer.pack_min_padding=1"])


def test_each_pass_runs_its_minibatch_in_the_layout_its_plan_chose():
    # two minibatches (one group each): lengths 9, 3 (67% padding: packed) and 9, 9 (padded)
    from trainer.step import batch_logp

    class Model(torch.nn.Module):  # the policy's log-prob door: what each call was given
        def policy_logprobs(self, ids, pos, temperature, chunk_tokens, packing=None, head=None):
            seen.append((tuple(ids.shape), packing is not None))
            return torch.zeros(pos.shape)

    batch = _batch([(1, 8), (1, 2)], [(1, 8), (1, 8)])
    cfg = load_config(["trainer.pack_sequences=true", "trainer.num_minibatches=2"])
    seen = []
    batch_logp(Model(), batch, StepSettings.from_config(cfg), torch.device("cpu"))
    assert seen == [((1, 12), True), ((2, 9), False)]  # one packed row of 9 + 3; two of 9


def _batch(*groups: list[tuple[int, int]], seed: int = 0):
    """One group per list of (prompt, output) lengths."""
    rng = np.random.default_rng(seed)
    return groups_to_batch([TrajectoryGroup(
        group_id=f"g{i}", server_id="s", lease_id="0", prompt_index=i, epoch=0,
        trajectories=[Trajectory.of(prompt_ids=rng.integers(4, 100, p),
                                    output_ids=rng.integers(4, 100, o), behav_logp=np.full(o, -1.0),
                                    versions=np.zeros(o, np.int32), reward=1.0,
                                    finish_reason="stop")
                      for p, o in shapes]) for i, shapes in enumerate(groups)])


def test_trained_tokens_per_s_counts_the_passes_over_the_batch():
    from trainer.loop import layout_metrics

    stats = {"seq_tokens": 300.0, "padding_share": 0.25, "tokens_per_micro_batch": 100.0,
             "rank_token_spread": 0.02, "packed_minibatches": 1.0, "loss": 1.0}
    # 300 real tokens over the prox recompute (1 s) and the step (2 s); the data wait not counted
    got = layout_metrics(stats, {"fetch_batch": 10.0, "recompute_prox": 1.0, "train_step": 2.0})
    assert got == {"trained_tokens_per_s": 100.0, "padding_share": 0.25,
                   "tokens_per_micro_batch": 100.0, "rank_token_spread": 0.02,
                   "packed_minibatches": 1.0}
