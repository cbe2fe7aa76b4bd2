"""Packed, token-budget micro-batches against today's padded ones, on a long-tailed batch.

The batch: ``--seqs`` sequences whose total lengths (prompt + output) are log-normal with median
``--median`` and sigma ``--sigma``, clipped to [32, ``--max-len``]; each prompt is a quarter of
its sequence, between 16 and 256 tokens; groups of ``--group`` sequences. The model:
``model=small`` (a Qwen2 shape: hidden 384, 4 layers, 6 heads, 2 KV heads; ~7M parameters) with
``max_position_embeddings`` raised to ``--max-len``, fp32, on CPU, one thread, one rank. The
step: ``trainer.step.train_step`` with decoupled PPO, one minibatch (the proximal log-probs come
from the training forward: one forward/backward per micro-batch).

Cases (one JSON line each; ``ratio`` is higher-is-better):
- ``packing_trained_tokens_per_s``: trained tokens (prompt + output, padding not counted) per
  second of ``train_step``: the packed path with ``trainer.max_tokens_per_micro_batch=--budget``
  (``figure``) against today's padded path (``baseline``): the plan before this change, sequences
  dealt to ranks round-robin in batch order, ``--mbs`` per micro-batch, right-padded (reproduced
  here as ``todays_plan``), measured in the same run, alternated ``--repeats`` times (medians).
  Goal: ratio >= 1.8.
- ``padding_share``: the share of computed token positions that are padding, packed (``figure``)
  and today's (``baseline``); ratio = the real-token shares' ratio. Goal: figure <= 0.05.
- ``rank_token_spread_2ranks``: (largest - smallest) / mean tokens per rank over two ranks, by
  the longest-first plan (``figure``) and by today's round-robin (``baseline``). The tokens each
  rank gets follow from the plan alone (every rank computes it), so no second process runs.
  ratio = baseline / figure (null when the figure is 0). Goal: figure <= 0.10.
- ``peak_memory_at_budget``: peak bytes of tensors a second ``train_step`` allocates
  (``benchmarks.memory.PeakTensorBytes``), packed at the budget (``figure``) against padded at the
  same budget (``baseline``: ``pack_sequences=false``, micro-batches of at most ``--budget``
  computed positions). ratio = baseline / figure. Goal: ratio >= 1.

    .venv/bin/python benchmarks/bench_packing.py                       # ~64 sequences, minutes
    .venv/bin/python benchmarks/bench_packing.py --seqs 24 --max-len 2048 --repeats 1

A loaded machine (1-minute load above half the CPUs) still gets its lines, with a warning on
stderr and ``"loaded": true``: the ratio of one run is then the number to read, not the rates.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.transport_report import at_least, number_in  # noqa: E402


def long_tailed_batch(seqs: int, median: int, sigma: float, max_len: int, group: int,
                      seed: int = 0):
    import numpy as np

    from areal_like.wire.protocol import TrajectoryGroup
    from areal_like.wire.trajectory import Trajectory
    from trainer.data import groups_to_batch

    rng = np.random.default_rng(seed)
    total = np.clip(rng.lognormal(np.log(median), sigma, seqs), 32, max_len).astype(int)
    trajs = []
    for n in total:
        p = int(np.clip(n // 4, 16, 256))
        o = int(n) - p
        trajs.append(Trajectory.of(prompt_ids=rng.integers(4, 100, p),
                                   output_ids=rng.integers(4, 100, o),
                                   behav_logp=-rng.random(o) * 3, versions=np.zeros(o, np.int32),
                                   reward=float(rng.integers(0, 2)), finish_reason="stop"))
    groups = [TrajectoryGroup(group_id=f"g{k}", server_id="s", lease_id=str(k), prompt_index=k,
                              epoch=0, trajectories=trajs[k:k + group])
              for k in range(0, seqs, group)]
    return groups_to_batch(groups), total


def todays_plan(batch, rows, s, world: int = 1):
    """The plan before packing (trainer/step.py's local_microbatches then): rows dealt to ranks
    round-robin in batch order, runs of ``micro_batch_size``, every rank as many calls."""
    import math

    from trainer.packing import Plan

    lens = {int(r): int(batch.prompt_lens[r] + batch.output_lens[r]) for r in rows}
    mbs, n_calls = s.micro_batch_size, math.ceil(math.ceil(len(rows) / world) / s.micro_batch_size)
    calls = []
    for rank in range(world):
        mine = rows[rank::world]
        chunks = [mine[i:i + mbs] for i in range(0, len(mine), mbs)]
        calls.append(chunks + [None] * (n_calls - len(chunks)))
    return Plan(calls, lens, packed=False)


def settings(overrides: list[str]):
    from areal_like.settings.config import load_config
    from trainer.step import StepSettings

    cfg = load_config(["model=small", "trainer.loss.kernel=decoupled_ppo", "trainer.grad_clip=1e9",
                       "trainer.skip_zero_advantage=false",  # every row, as measured before
                       *overrides])
    return cfg, StepSettings.from_config(cfg)


def timed_step(cfg, s, batch, today: bool = False) -> tuple[float, dict]:
    """Seconds of one ``train_step`` (a fresh policy, built outside the timing) and its stats."""
    import trainer.step as step
    from trainer.model import build_policy

    policy = build_policy(cfg.model, cfg.trainer)
    real_plan = step.plan
    if today:
        step.plan = todays_plan  # the baseline's layout, nothing else
    try:
        t0 = time.perf_counter()
        stats = step.train_step(policy, batch, s, None)
        return time.perf_counter() - t0, stats
    finally:
        step.plan = real_plan


def peak_bytes(cfg, s, batch) -> int:
    """Tensor bytes a second ``train_step`` allocates at its peak (AdamW's moments exist)."""
    from benchmarks.memory import PeakTensorBytes
    from trainer.model import build_policy
    from trainer.step import train_step

    policy = build_policy(cfg.model, cfg.trainer)
    train_step(policy, batch, s, None)
    with PeakTensorBytes() as m:
        train_step(policy, batch, s, None)
    return m.peak


def largest_call(batch, s) -> int:
    """Token positions (padding included) of the largest micro-batch ``s``'s plan computes: both
    paths stay within the budget, the packed one fills it closer (fewer, fuller micro-batches)."""
    from trainer.step import minibatches, plan

    p = plan(batch, minibatches(batch, 1)[0], s)
    return max(p.computed(c) for c in p.calls[0] if c is not None)


def spread(per_rank: list[int]) -> float:
    mean = sum(per_rank) / len(per_rank)
    return (max(per_rank) - min(per_rank)) / mean if mean else 0.0


def rank_tokens(plan) -> list[int]:
    return [sum(plan.lens[int(r)] for c in cs if c is not None for r in c) for cs in plan.calls]


def line(name: str, figure: float, unit: str, baseline: float, ratio: float | None,
         goal: float | str, **extra) -> str:
    return json.dumps({"name": name, "figure": round(figure, 4), "unit": unit,
                       "baseline": round(baseline, 4),
                       "ratio": None if ratio is None else round(ratio, 3), "goal": goal, **extra})


def throughput(args, batch, tokens: int, shape: dict, paths) -> float:
    """The tokens/s case; returns the packed path's padding share."""
    (cfg_today, s_today), (cfg_new, s_new) = paths
    today_s, new_s = [], []
    for _ in range(args.repeats):  # alternated, so a change of load hits both alike
        today_s.append(timed_step(cfg_today, s_today, batch, today=True)[0])
        dt, stats = timed_step(cfg_new, s_new, batch)
        new_s.append(dt)
    base_rate, new_rate = tokens / statistics.median(today_s), tokens / statistics.median(new_s)
    print(line("packing_trained_tokens_per_s", new_rate, "tokens/s", base_rate,
               new_rate / base_rate, 1.8, seconds=[round(x, 2) for x in new_s],
               baseline_seconds=[round(x, 2) for x in today_s], **shape), flush=True)
    return stats["padding_share"]


def layout_cases(args, batch, tokens: int, shape: dict, s_today, packed_share: float) -> None:
    """The padding share and the two-rank token spread: properties of the plans."""
    from trainer.packing import plan_minibatch
    from trainer.step import minibatches

    rows = minibatches(batch, 1)[0]
    today1 = todays_plan(batch, rows, s_today)
    share = 1 - tokens / sum(today1.computed(c) for c in today1.calls[0] if c is not None)
    print(line("padding_share", packed_share, "share of computed positions", share,
               (1 - packed_share) / (1 - share), "figure <= 0.05", **shape), flush=True)
    lpt = plan_minibatch(rows, batch.prompt_lens + batch.output_lens, 2, max_seqs=args.mbs,
                         max_tokens=args.budget, packed=True)
    new = spread(rank_tokens(lpt))
    old = spread(rank_tokens(todays_plan(batch, rows, s_today, 2)))
    print(line("rank_token_spread_2ranks", new, "(max - min) / mean tokens per rank", old,
               old / new if new else None, "figure <= 0.10", rank_tokens=rank_tokens(lpt), **shape),
          flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=at_least(1), default=64)
    p.add_argument("--median", type=at_least(1), default=300,
                   help="median length (prompt + output)")
    p.add_argument("--sigma", type=number_in(0, low_ok=True), default=0.8,
                   help="log-normal sigma of the lengths")
    p.add_argument("--max-len", type=at_least(1), default=4096)
    p.add_argument("--group", type=at_least(1), default=8, help="sequences per group")
    p.add_argument("--mbs", type=at_least(1), default=8, help="today's trainer.micro_batch_size")
    p.add_argument("--budget", type=at_least(1), default=4096,
                   help="trainer.max_tokens_per_micro_batch")
    p.add_argument("--repeats", type=at_least(1), default=2,
                   help="timed steps of each path, alternated")
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from trainer.model import init_distributed, leave_distributed

    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    loaded = load > cpus / 2
    if loaded:
        print(f"warning: loaded machine (1-minute load {load:.1f} on {cpus} CPUs): the rates "
              "are low and noisy; compare the ratios of one run only", file=sys.stderr)
    batch, lens = long_tailed_batch(args.seqs, args.median, args.sigma, args.max_len, args.group)
    tokens = int(lens.sum())
    shape = {"seqs": args.seqs, "tokens": tokens, "longest": int(lens.max()),
             "lengths": f"log-normal median {args.median} sigma {args.sigma}, clipped to "
                        f"[32, {args.max_len}], prompts 1/4 in [16, 256]",
             "mbs": args.mbs, "budget": args.budget, "threads": 1,
             "model": "small (Qwen2 shape, 384 hidden, 4 layers)",
             "load_avg_1m": round(load, 2), "loaded": loaded}
    common = [f"model.max_position_embeddings={max(512, args.max_len)}"]
    today = settings([*common, "trainer.pack_sequences=false",
                      f"trainer.micro_batch_size={args.mbs}"])
    new = settings([*common, "trainer.pack_sequences=true", "trainer.pack_min_padding=0",
                    f"trainer.max_tokens_per_micro_batch={args.budget}"])
    padded = settings([*common, "trainer.pack_sequences=false",
                       f"trainer.max_tokens_per_micro_batch={args.budget}"])
    init_distributed(new[0].trainer)
    timed_step(*new, long_tailed_batch(4, 64, 0.1, 128, 4)[0])  # warm-up, not timed
    packed_share = throughput(args, batch, tokens, shape, (today, new))
    layout_cases(args, batch, tokens, shape, today[1], packed_share)
    new_peak, pad_peak = peak_bytes(*new, batch), peak_bytes(*padded, batch)
    print(line("peak_memory_at_budget", new_peak / 2**20, "MiB (tensor peak of a step)",
               pad_peak / 2**20, pad_peak / new_peak,
               "ratio >= 1 (packed <= padded at the same budget)",
               largest_micro_batch=largest_call(batch, new[1]),
               baseline_largest_micro_batch=largest_call(batch, padded[1]), **shape), flush=True)
    leave_distributed()


if __name__ == "__main__":
    main()
