"""Scoring one step's groups in the reward pool: a group per call against a sample per call.

A rollout server scores each finished group with ``RewardPool.score_group`` (its samples split
among the workers, each worker getting its share queued at once: rollout_server/reward_pool.py).
The baseline is the same samples scored one call each (a thread handoff and a round trip to a
worker per sample: what the pool did per sample before shares), in the same run. The workload is
one step of benchmarks/bench_vs_trl.py: 8 groups of 8 short answers to 2-digit additions, scored
concurrently by the task's own reward (``areal_like.tasks.task:exact_match``) in 2 workers.

One JSON line: ``figure`` = wall ms per step with group calls, ``baseline`` = with sample calls
(medians over ``--rounds``), ``ratio`` = baseline / figure (higher is better; goal >= 1.5: the pool
must not be what a step waits for), and the rollout server's own CPU ms per step for both
(``cpu_ms``, ``baseline_cpu_ms``: the thread handoffs and pickling happen in its process, on the
core it shares with its engine). A ``warning`` field when the machine is loaded.

Run: ``python benchmarks/bench_reward_pool.py [--rounds 200]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

from areal_like.settings.config import load_config
from areal_like.tasks.task import make_task
from rollout_server.reward_pool import RewardPool

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from transport_report import at_least, load_warning  # noqa: E402

GROUPS, GROUP_SIZE, GOAL = 8, 8, 1.5


async def step(pool: RewardPool, groups: list, per_sample: bool) -> None:
    async def one(example, responses):
        if per_sample:
            await asyncio.gather(*(pool.score(example.prompt, r, example) for r in responses))
        else:
            await pool.score_group(example.prompt, responses, example)
    await asyncio.gather(*(one(ex, rs) for ex, rs in groups))


async def measure(pool: RewardPool, groups: list, rounds: int) -> dict:
    times: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, float] = {False: 0.0, True: 0.0}
    for per_sample in (False, True):  # warm both paths (workers started, caches filled)
        await step(pool, groups, per_sample)
    for _ in range(rounds):  # interleaved, so load spikes hit both alike
        for per_sample in (False, True):
            c0, t0 = time.process_time(), time.perf_counter()
            await step(pool, groups, per_sample)
            times[per_sample].append(time.perf_counter() - t0)
            cpu[per_sample] += time.process_time() - c0
    figure, baseline = (statistics.median(times[k]) * 1e3 for k in (False, True))
    return {"name": f"reward_pool_step_{GROUPS}x{GROUP_SIZE}", "figure": round(figure, 3),
            "unit": "ms per step",
            "baseline": round(baseline, 3), "ratio": round(baseline / figure, 3), "goal": GOAL,
            "goal_met": baseline / figure >= GOAL, "cpu_ms": round(cpu[False] / rounds * 1e3, 3),
            "baseline_cpu_ms": round(cpu[True] / rounds * 1e3, 3), "workers": len(pool.worker_pids),
            "rounds": rounds, **load_warning()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rounds", type=at_least(1), default=200)
    args = ap.parse_args()
    # the workload of bench_vs_trl, scored in the default 2 sandboxed workers (that benchmark scores
    # in-process, task.reward_workers=0, where no call reaches a worker)
    cfg = load_config(["experiment=bench_vs_trl", "task.reward_workers=2"])
    task = make_task(cfg.task)
    groups = []
    for i in range(GROUPS):
        ex = task.example(i)
        # half right
        groups.append((ex, [ex.answer if k % 2 else str(k) for k in range(GROUP_SIZE)]))
    pool = RewardPool(cfg.task, task.reward_path)
    try:
        print(json.dumps(asyncio.run(measure(pool, groups, args.rounds))), flush=True)
    finally:
        pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
