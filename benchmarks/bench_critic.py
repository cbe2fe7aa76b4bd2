"""PPO with a critic against GRPO on the same task and wall budget.

Runs the real system (``launch.job.run_job``: warm start, buffer, one rollout server with the
embedded engine, a one-rank trainer, final evaluation) on the quickstart's task twice, with
``loss=ppo_critic`` (decoupled PPO, GAE from a critic of the policy's shape; trainer/critic.py) and
with ``loss=grpo`` (group-normalised outcome advantages), the same steps, seed and recipe
otherwise. The wall budget is the shorter of the two runs' trainer wall times (first step to last):
each case's reward curve is cut there, so both are read over the same seconds.

One JSON line per case: ``name`` (``critic_ppo`` / ``grpo``), ``figure`` = trained samples per
second of the trainer's wall (sequences trained / seconds from the first step's record to the
last's), ``unit`` samples/s, ``baseline`` = grpo's figure, ``ratio``, ``goal`` (none: a
measurement), ``reward_at_budget`` (the 10-step mean batch reward at the budget),
``reward_first`` / ``reward_last`` (10-step means), ``final_mean_at_4`` (held-out sampled
accuracy at the last version), ``reward_curve`` ([seconds, 10-step mean reward] every 5 steps up
to the budget), ``trainer_phase_ms`` (median ms per step of each trainer phase).

    python benchmarks/bench_critic.py [--steps 200] [--seed 0] [--out FILE] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from areal_like.settings.config import load_config  # noqa: E402
from benchmarks.transport_report import at_least  # noqa: E402
from launch.job import run_job  # noqa: E402
from launch.records import eval_records, step_records  # noqa: E402

CASES = {"critic_ppo": "ppo_critic", "grpo": "grpo"}
WINDOW = 10


def run_case(loss: str, steps: int, seed: int, run_dir: Path) -> Path:
    cfg = load_config(["experiment=quickstart", "topology=local_cpu", f"loss={loss}",
                       f"run_dir={run_dir}", f"seed={seed}", f"trainer.steps={steps}",
                       "launch.num_rollout_servers=1", "launch.trainer_ranks=1",
                       "launch.restarts=0", f"trainer.checkpoint_every={steps}",
                       "tracking.sample_every=0", "export.at_end=false"])
    with contextlib.redirect_stdout(io.StringIO()):
        code = run_job(cfg, quiet=True)
    if code != 0:
        raise SystemExit(f"{run_dir.name}: run failed (exit {code}); logs in {run_dir / 'logs'}")
    return run_dir


def windowed(recs: list[dict], i: int) -> float:
    lo = max(0, i - WINDOW + 1)
    return statistics.mean(r["reward_mean"] for r in recs[lo:i + 1])


def summarize(name: str, run_dir: Path, budget_s: float, steps: int) -> dict:
    recs = step_records(run_dir)
    t0 = recs[0]["time"]
    inside = [i for i, r in enumerate(recs) if r["time"] - t0 <= budget_s]
    wall = recs[-1]["time"] - t0
    evals = {e["policy_version"]: e for e in eval_records(run_dir)}
    phases = sorted({k for r in recs for k in r.get("phase_seconds", {})})
    return {"name": name, "figure": round(sum(r["seqs"] for r in recs[1:]) / max(wall, 1e-9), 2),
            "unit": "samples/s", "goal": None, "steps": len(recs), "trainer_wall_s": round(wall, 1),
            "budget_s": round(budget_s, 1),
            "reward_at_budget": round(windowed(recs, inside[-1]), 3),
            "reward_first": round(statistics.mean(r["reward_mean"] for r in recs[:WINDOW]), 3),
            "reward_last": round(windowed(recs, len(recs) - 1), 3),
            "final_mean_at_4": (evals.get(steps) or {}).get("mean@4"),
            "reward_curve": [[round(recs[i]["time"] - t0, 1), round(windowed(recs, i), 3)]
                             for i in inside[::5]],
            "trainer_phase_ms": {k: round(1000 * statistics.median(
                r["phase_seconds"].get(k, 0.0) for r in recs), 1) for k in phases}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=at_least(WINDOW), default=200)
    ap.add_argument("--seed", type=at_least(0), default=0)
    ap.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file")
    ap.add_argument("--keep", type=Path, default=None, help="run directories here (kept)")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_critic_"))
    dirs = {name: run_case(loss, args.steps, args.seed, root / name)
            for name, loss in CASES.items()}
    walls = {n: step_records(d)[-1]["time"] - step_records(d)[0]["time"] for n, d in dirs.items()}
    budget = min(walls.values())
    lines = [summarize(n, d, budget, args.steps) for n, d in dirs.items()]
    base = next(x["figure"] for x in lines if x["name"] == "grpo")
    for x in lines:
        x["baseline"], x["ratio"] = base, round(x["figure"] / base, 3) if base else None
        print(json.dumps(x), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(x) + "\n")


if __name__ == "__main__":
    main()
