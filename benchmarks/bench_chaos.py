"""Wasted generation under faults: the quickstart run clean, then with ``kill -9`` of the trainer
twice and of the buffer once (by PID, at 33%, 50% and 71% of the steps), on the same machine.

Wasted generation = groups the buffer acknowledged (the rollout servers' ``groups_acked``
counters, read while every daemon is still up at the end; the rollout servers are never killed)
minus the groups the final weights were trained on (``steps_trained * groups_per_step``): what
was generated and never trained on, as stale, filtered, rolled back with a crashed trainer, or
left in the pipeline at the end. Also reported: the run's outcome (ok, steps_trained,
rolled_back_steps) and the largest staleness any step consumed against eta.

One JSON line: figure = chaos run's wasted share, baseline = clean run's, ratio = figure / baseline
(goal <= 2).

    python benchmarks/bench_chaos.py [--steps 200] [--checkpoint-every 50] [--checkpoint-async]

Both runs use the same checkpoint settings; each run also reports its mean checkpoint phase per
step (``checkpoint_s_per_step``), what taking checkpoints that often costs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from areal_like.config import load_config  # noqa: E402
from areal_like.metrics import scrape  # noqa: E402
from launch.job import job_specs, prepare  # noqa: E402
from launch.local import Supervisor  # noqa: E402
from launch.records import outcome, step_records  # noqa: E402
from launch.warmstart import ensure_warm_start  # noqa: E402

FAULTS = ((0.33, "trainer"), (0.5, "buffer"), (0.71, "trainer"))  # (share of trainer.steps, daemon); off
# multiples of a round checkpoint_every, where a kill would find the newest save just started


class Chaos:
    """on_tick: ``kill -9`` each daemon of ``FAULTS`` by PID once training passed its step."""

    def __init__(self, run_dir: Path, steps: int):
        self.run_dir, self.plan, self.killed = run_dir, [(int(f * steps), d) for f, d in FAULTS], []

    def __call__(self, sup: Supervisor) -> None:
        if not self.plan:
            return
        recs = step_records(self.run_dir)
        at, name = self.plan[0]
        pid = sup.pids().get(name)
        if recs and recs[-1]["step"] >= at and pid is not None:
            # the ranks too: torchrun alone would leave them to the supervisor's SIGTERM (they would save)
            for proc in [*psutil.Process(pid).children(recursive=True), psutil.Process(pid)]:
                os.kill(proc.pid, signal.SIGKILL)
            self.killed.append({"daemon": name, "step": recs[-1]["step"], "pid": pid})
            self.plan.pop(0)


def run(run_dir: Path, args, chaos: bool) -> dict:
    cfg = load_config(["experiment=quickstart", f"run_dir={run_dir}", f"trainer.steps={args.steps}",
                       f"trainer.checkpoint_every={args.checkpoint_every}",
                       f"trainer.checkpoint_async={args.checkpoint_async}", "eval.at_end=false"])
    cfg = ensure_warm_start(cfg, log=lambda m: print(f"[warm-start] {m}", file=sys.stderr))
    cfg, topo, path = prepare(cfg)
    acked: list[int] = []

    def read_acked(_sup: Supervisor) -> None:
        acked.append(sum(int(scrape(f"http://{topo.host}:{s.metrics_port}/metrics")
                             .get("areal_rollout_groups_acked_total", 0)) for s in topo.slots if s.kind == "rollout"))

    faults = Chaos(run_dir, args.steps) if chaos else None
    sup = Supervisor(job_specs(cfg, topo, path), run_dir, restarts=cfg.launch.restarts,
                     health_timeout_s=cfg.launch.health_timeout_s, echo=lambda _: None, on_tick=faults)
    sup.on_complete = read_acked
    t0 = time.monotonic()
    code = sup.run()
    result = outcome(run_dir, code)
    if not result["ok"] or not acked:
        raise SystemExit(f"{'chaos' if chaos else 'clean'} run failed: {sup.outcome}; logs in {run_dir / 'logs'}")
    trained = result["steps_trained"] * cfg.buffer.groups_per_step
    recs = step_records(run_dir)
    ckpt_s = sum(r.get("phase_seconds", {}).get("checkpoint", 0.0) for r in recs) / len(recs)
    return {"checkpoint_s_per_step": round(ckpt_s, 4),
            "step_s": round(sum(r["step_seconds"] for r in recs) / len(recs), 4),"wall_s": round(time.monotonic() - t0, 1), "acked": acked[0], "trained": trained,
            "wasted": acked[0] - trained, "wasted_share": round((acked[0] - trained) / acked[0], 4),
            "steps_trained": result["steps_trained"], "rolled_back_steps": result["rolled_back_steps"],
            "staleness_max": max(r["staleness_max"] for r in recs),
            "eta": cfg.buffer.max_staleness, "faults": faults.killed if faults else []}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--checkpoint-every", type=int, default=50)
    ap.add_argument("--checkpoint-async", action="store_true", help="trainer.checkpoint_async=true")
    ap.add_argument("--root", type=Path, default=None, help="directory for both runs (a warm start there is reused)")
    args = ap.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    stamp = time.strftime("%H%M%S")
    clean = run(root / f"clean-{stamp}", args, chaos=False)
    chaos = run(root / f"chaos-{stamp}", args, chaos=True)
    print(json.dumps({"bench": "chaos", "figure": chaos["wasted_share"], "baseline": clean["wasted_share"],
                      "ratio": round(chaos["wasted_share"] / max(clean["wasted_share"], 1e-9), 2),
                      "clean": clean, "chaos": chaos, "steps": args.steps,
                      "checkpoint_every": args.checkpoint_every, "checkpoint_async": args.checkpoint_async,
                      "run_dir": str(root)}))


if __name__ == "__main__":
    main()
