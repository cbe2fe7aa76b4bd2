"""Held-out accuracy of the reversal task after RL scored by the shipped demo's reward model
(rollout_server/ROLLOUT.md, "Reward models"; issue 65 asks for a rise of at least 0.2).

Per seed: ``benchmarks.reward_model_demo`` trains a reward model (``--rm`` arguments, the seed
appended), then ``areal-like run experiment=quickstart`` is scored by it (``--run`` overrides, the
seed appended) with an evaluation at versions 0 and ``trainer.steps``; ``--rounds 2`` retrains the
reward model with the first round's exported policy's samples as wrong answers too (iterated
RLHF) and runs RL again from the warm start. One JSON line per seed and round (figure: mean@4 at
the end less at version 0, scored by the true rule; baseline: mean@4 at version 0; ratio: the
rise over the 0.2 issue 65 asks, goal 1), then one with the medians.

    python -m benchmarks.bench_reward_model_rl --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

DEFAULT_RM = ""  # the demo's defaults: negatives from the warm start's samples
DEFAULT_RUN = "trainer.loss.kl_coef=1.0"
RISE = 0.2  # issue 65's goal: ratio = rise / RISE, passing at 1


def _evals(run_dir: Path) -> tuple[dict, dict]:
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    return evals[0], evals[-1]


def one(out: Path, seed: int, rnd: int, rm_args: list[str], run_args: list[str]) -> dict:
    """Train the reward model, run RL scored by it from the quickstart's cached warm start (the
    policy the model's negatives were sampled from); the case's JSON line."""
    from areal_like.settings.config import load_config
    from launch.warmstart import ensure_warm_start

    warm = ensure_warm_start(load_config(["experiment=quickstart"])).model.path
    rm, run_dir = out / f"rm_s{seed}_r{rnd}", out / f"run_s{seed}_r{rnd}"
    trained = subprocess.run([sys.executable, "-m", "benchmarks.reward_model_demo", "--out",
                              str(rm), "--seed", str(seed), *rm_args], check=True,
                             stdout=subprocess.PIPE, text=True)
    rm_line = json.loads(trained.stdout.strip().splitlines()[-1])
    subprocess.run([sys.executable, "-m", "launch.cli", "run", "-q", "experiment=quickstart",
                    f"task.reward_model.path={rm}", f"run_dir={run_dir}", f"seed={seed}",
                    f"model.path={warm}", "warm_start.steps=0",
                    "eval.every=1000000", *run_args], check=True, stdout=subprocess.PIPE)
    first, last = _evals(run_dir)
    return {"name": f"reward_model_rl_round{rnd}", "seed": seed,
            "figure": round(last["mean@4"] - first["mean@4"], 4), "unit": "mean@4 rise",
            "baseline": round(first["mean@4"], 4), "final": round(last["mean@4"], 4),
            "ratio": round((last["mean@4"] - first["mean@4"]) / RISE, 4), "goal": 1.0,
            "greedy": [first["greedy_accuracy"], last["greedy_accuracy"]],
            "rm_accuracy": rm_line["figure"],
            "rm_policy_pairs_accuracy": rm_line.get("policy_pairs_accuracy"),
            "rm_substitution_accuracy": rm_line.get("substitution_accuracy"),
            "rm": " ".join(rm_args), "run": " ".join(run_args), "run_dir": str(run_dir)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench_reward_model_rl")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, choices=(1, 2), default=1)
    ap.add_argument("--rm", default=DEFAULT_RM, help="the reward model trainer's arguments")
    ap.add_argument("--run", default=DEFAULT_RUN, help="the RL job's overrides")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[int, list[float]] = {}
    for seed in args.seeds:
        rm_args = shlex.split(args.rm)
        for rnd in range(1, args.rounds + 1):
            line = one(out, seed, rnd, rm_args, shlex.split(args.run))
            print(json.dumps(line), flush=True)
            figures.setdefault(rnd, []).append(line["figure"])
            export = sorted((Path(line["run_dir"]) / "export").iterdir())[-1]
            kept = [] if "--policy" in rm_args else ["--policy", "warm_start"]  # the default's
            rm_args = [*rm_args, *kept, "--policy", str(export)]
    for rnd, values in figures.items():
        print(json.dumps({"name": f"reward_model_rl_round{rnd}_median",
                          "figure": round(statistics.median(values), 4), "unit": "mean@4 rise",
                          "ratio": round(statistics.median(values) / RISE, 4), "goal": 1.0,
                          "seeds": args.seeds, "figures": values,
                          "rm": args.rm, "run": args.run}), flush=True)


if __name__ == "__main__":
    main()
