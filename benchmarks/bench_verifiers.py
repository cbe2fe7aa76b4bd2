"""How much RL raises the reward of the shipped verifiers examples, through the CLI, on CPU.

For each example (``experiment=vf_reverse``: single-turn; ``experiment=vf_calc``: multi-turn with
an MCP tool) and each seed, ``areal-like run -q experiment=EXAMPLE seed=S`` as shipped, in a new
run directory under ``ROOT`` (its warm start cached under ``ROOT/warm-start``, which a rerun on
the same ``--root`` reuses), then the job's ``metrics/trainer.jsonl``: a step's ``reward_mean``
is the mean reward of its episodes. One JSON line per example: figure, the
mean reward over RL's last 10 steps; baseline, over its first 10 (the warm-started model); both
medians over the seeds; ratio figure / baseline; goal: a rise (figure - baseline) of at least
0.3. Beside them each seed's pair, and the share of the logged episodes (``samples.jsonl``) that
call a tool in the first and last third of the run.

    python -m benchmarks.bench_verifiers [KEY=VALUE ...] [--root DIR] [--seeds 0 1 2]
        [--examples vf_reverse vf_calc]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.bench_sft_then_rl import cli

GOAL = 0.3  # on the rise: the last 10 steps' mean reward minus the first 10's


def run_example(root: Path, example: str, seed: int, overrides: list[str]) -> dict:
    run_dir = Path(tempfile.mkdtemp(dir=root, prefix=f"{example}-seed{seed}-")) / "run"
    t0 = time.monotonic()
    cli("run", "-q", f"experiment={example}", f"seed={seed}", f"run_dir={run_dir}",
        f"warm_start.cache_dir={root / 'warm-start'}", *overrides)
    metrics = (run_dir / "metrics/trainer.jsonl").read_text().splitlines()
    rewards = [json.loads(m)["reward_mean"] for m in metrics if "reward_mean" in m]
    samples = [json.loads(s) for s in (run_dir / "samples.jsonl").read_text().splitlines()]
    third = max(1, len(samples) // 3)
    return {"first10": statistics.fmean(rewards[:10]), "last10": statistics.fmean(rewards[-10:]),
            "steps": len(rewards), "wall_s": round(time.monotonic() - t0, 1),
            "tool_calls": [round(_tool_share(samples[:third]), 2),
                           round(_tool_share(samples[-third:]), 2)]}


def _tool_share(samples: list[dict]) -> float:
    return sum("<tool_call>" in s["response"] for s in samples) / max(1, len(samples))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", help="working directory (default: a new temporary one)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--examples", nargs="+", default=["vf_reverse", "vf_calc"],
                    choices=["vf_reverse", "vf_calc"])
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="config overrides for every run (e.g. trainer.steps=80)")
    args = ap.parse_args(argv)
    root = Path(args.root or tempfile.mkdtemp(prefix="bench_verifiers_")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    for example in args.examples:
        runs = {s: run_example(root, example, s, args.overrides) for s in args.seeds}
        figure = round(statistics.median(r["last10"] for r in runs.values()), 3)
        baseline = round(statistics.median(r["first10"] for r in runs.values()), 3)
        print(json.dumps({
            "name": f"verifiers_{example}_reward", "figure": figure,
            "unit": "mean reward, RL's last 10 steps", "baseline": baseline,
            "ratio": round(figure / max(baseline, 1e-3), 2), "goal": f"rise >= {GOAL}",
            "rise": round(figure - baseline, 3), "passed": figure - baseline >= GOAL,
            "seeds": {s: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                      for s, r in runs.items()},
            "overrides": args.overrides, "root": str(root)}), flush=True)


if __name__ == "__main__":
    main()
