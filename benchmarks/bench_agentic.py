"""Asynchronous versus synchronous RL on long-tail multi-turn episodes, on the same machine in one run.

As ``bench_async.py`` (same measurement, same JSON convention), but every group is a set of
multi-turn conversations whose turn counts follow a heavy tail (``areal_like/envs.py``: LongTail;
``configs/experiment/bench_agentic.yaml``): most episodes take a turn or two, a few take up to 16,
and a synchronous step waits for its slowest group. The system runs twice, with eta = 0 and eta
= 4, the rollout pool and the trainer pool pinned to disjoint cores (launch.pin_cpus).

One JSON line: figure = achieved speedup (trained samples/s at eta 4 over eta 0), baseline = the
ideal speedup (G + T) / max(G, T) from the synchronous run's measured phases, ratio = achieved /
ideal (goal >= 0.8), and the turn distribution the episodes had.

    python benchmarks/bench_agentic.py [--steps 20] [--groups 8]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_async import run_job, speedup_line  # noqa: E402

from areal_like.config import load_config  # noqa: E402
from areal_like.envs import LongTail  # noqa: E402
from areal_like.tasks import make_task  # noqa: E402


def run_once(run_dir: Path, eta: int, args) -> list[dict]:
    cfg = load_config(["experiment=bench_agentic", f"buffer.groups_per_step={args.groups}",
                       f"buffer.max_staleness={eta}", f"trainer.steps={args.steps}",
                       f"trainer.micro_batch_size={8 * args.groups}", f"run_dir={run_dir}"])
    return run_job(cfg, run_dir, eta)


def turn_distribution(n: int = 2000) -> dict[str, float]:
    """Turn counts of the first ``n`` training prompts (what the episodes draw)."""
    task = make_task(load_config(["experiment=bench_agentic"]).task)
    turns = sorted(min(LongTail.TAIL_MAX_TURNS, int(random.Random(task.example(i).prompt).paretovariate(
        LongTail.TAIL_ALPHA))) for i in range(n))
    return {"mean": round(sum(turns) / n, 2), "p50": turns[n // 2], "p90": turns[int(n * 0.9)], "max": turns[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip", type=int, default=4, help="warm-up steps left out of every figure")
    ap.add_argument("--groups", type=int, default=8, help="groups per step (x8 samples)")
    ap.add_argument("--keep", default=None, help="keep both run directories under this path")
    args = ap.parse_args()
    line = speedup_line("agentic_async_vs_sync_speedup", "bench_agentic_", run_once, args)
    print(json.dumps({**line, "turns": turn_distribution()}))

if __name__ == "__main__":
    main()
