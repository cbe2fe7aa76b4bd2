"""Wasted generation under faults: the quickstart run clean, then with ``kill -9`` of the trainer
twice and of the buffer once (by PID, at 33%, 50% and 71% of the steps), on the same machine.

Wasted generation = groups the buffer acknowledged (the rollout servers' ``groups_acked``
counters, read while every daemon is still up at the end; the rollout servers are never killed)
minus the groups the final weights were trained on (``steps_trained * groups_per_step``): what
was generated and never trained on, as stale, filtered, rolled back with a crashed trainer, or
left in the pipeline at the end. Also reported: the run's outcome (ok, steps_trained,
rolled_back_steps) and the largest staleness any step consumed against eta.

``waste`` splits it per cause: ``rolled_back`` (batches trained by weights a crash lost:
rolled_back_steps x B), ``dropped_<reason>`` (the buffer's ``groups_dropped`` counters, read just
before its kill and at the end, so a restart's reset loses nothing), ``left_in_store`` (stored, not
yet trained, when the run ends) and ``other`` (the rest: groups lost at a fault, or dropped between
the last read and the kill; 0 when everything is accounted for). One known source of ``other``: with
an overlapped sync the trainer acks the batch of step v -> v+1 when it asks for the next one, before
v+1 is announced; killed in between, it resumes at v, so that step is lost without being counted in
``rolled_back_steps``.

One JSON line: figure = chaos run's wasted share, baseline = clean run's, ratio = baseline /
figure (higher is better; goal >= 0.5: the faults at most double the waste; a share of 0 counts as
1e-9, so two clean runs give 1).

    python benchmarks/bench_chaos.py [--steps 200] [--checkpoint-every 50] [--checkpoint-async]

Both runs use the same checkpoint settings; each run also reports its mean checkpoint phase per
step (``checkpoint_s_per_step``), what taking checkpoints that often costs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transport_report import at_least, load_warning  # noqa: E402

from areal_like.net.metrics import scrape  # noqa: E402
from areal_like.settings.config import load_config  # noqa: E402
from launch.job import job_specs, prepare  # noqa: E402
from launch.local import Supervisor  # noqa: E402
from launch.records import outcome, step_records  # noqa: E402
from launch.warmstart import ensure_warm_start  # noqa: E402

FAULTS = ((0.33, "trainer"), (0.5, "buffer"),
          (0.71, "trainer"))  # (share of trainer.steps, daemon); off
# multiples of a round checkpoint_every, where a kill would find the newest save just started


DROPPED = "areal_buffer_groups_dropped_total"


def buffer_counts(url: str) -> Counter:
    """The buffer's dropped groups per reason (``dropped_<reason>``) and its stored groups
    (``stored``)."""
    values, out = scrape(url), Counter()
    for series, value in values.items():
        if series.startswith(DROPPED + "{") and 'reason="' in series:
            out["dropped_" + series.split('reason="', 1)[1].split('"', 1)[0]] += int(value)
    out["stored"] = int(values.get('areal_buffer_groups{state="stored"}', 0))
    return out


class Chaos:
    """on_tick: ``kill -9`` each daemon of ``FAULTS`` by PID once training passed its step; the
    buffer's counters are read just before its kill (a restart resets them)."""

    def __init__(self, run_dir: Path, steps: int, buffer_url: str):
        self.run_dir, self.plan, self.killed = run_dir, [(int(f * steps), d) for f, d in FAULTS], []
        self.buffer_url, self.before_kills = buffer_url, Counter()

    def __call__(self, sup: Supervisor) -> None:
        if not self.plan:
            return
        recs = step_records(self.run_dir)
        at, name = self.plan[0]
        pid = sup.pids().get(name)
        if recs and recs[-1]["step"] >= at and pid is not None:
            if name == "buffer":
                counts = buffer_counts(self.buffer_url)
                del counts["stored"]  # the store survives the restart (the WAL): counted at the end
                self.before_kills.update(counts)
            # the ranks too: torchrun alone would leave them to the supervisor's SIGTERM
            # (they would save)
            for proc in [*psutil.Process(pid).children(recursive=True), psutil.Process(pid)]:
                os.kill(proc.pid, signal.SIGKILL)
            self.killed.append({"daemon": name, "step": recs[-1]["step"], "pid": pid})
            self.plan.pop(0)


def run(run_dir: Path, args, chaos: bool) -> dict:
    cfg = load_config(["experiment=quickstart", f"run_dir={run_dir}",  # the measured layout:
                       "launch.num_rollout_servers=2", "launch.trainer_ranks=2",
                       f"trainer.steps={args.steps}",
                       f"trainer.checkpoint_every={args.checkpoint_every}",
                       f"trainer.checkpoint_async={args.checkpoint_async}", "eval.at_end=false"])
    cfg = ensure_warm_start(cfg, log=lambda m: print(f"[warm-start] {m}", file=sys.stderr))
    cfg, topo, path = prepare(cfg)
    acked: list[int] = []
    buffer_url = next(f"http://{topo.host}:{s.metrics_port}/metrics"
                      for s in topo.slots if s.kind == "buffer")
    at_end: Counter = Counter()

    def read_acked(_sup: Supervisor) -> None:
        acked.append(sum(int(scrape(f"http://{topo.host}:{s.metrics_port}/metrics")
                             .get("areal_rollout_groups_acked_total", 0))
                         for s in topo.slots if s.kind == "rollout"))
        at_end.update(buffer_counts(buffer_url))

    faults = Chaos(run_dir, args.steps, buffer_url) if chaos else None
    sup = Supervisor(job_specs(cfg, topo, path), run_dir, restarts=cfg.launch.restarts,
                     health_timeout_s=cfg.launch.health_timeout_s, echo=lambda _: None,
                     on_tick=faults)
    sup.on_complete = read_acked
    t0 = time.monotonic()
    code = sup.run()
    result = outcome(run_dir, code)
    if not result["ok"] or not acked:
        raise SystemExit(f"{'chaos' if chaos else 'clean'} run failed: {sup.outcome}; "
                         f"logs in {run_dir / 'logs'}")
    trained = result["steps_trained"] * cfg.buffer.groups_per_step
    waste = waste_by_cause(acked[0] - trained,
                           result["rolled_back_steps"] * cfg.buffer.groups_per_step,
                           at_end + (faults.before_kills if faults else Counter()))
    recs = step_records(run_dir)
    ckpt_s = sum(r.get("phase_seconds", {}).get("checkpoint", 0.0) for r in recs) / len(recs)
    return {"checkpoint_s_per_step": round(ckpt_s, 4),
            "step_s": round(sum(r["step_seconds"] for r in recs) / len(recs), 4),
            "wall_s": round(time.monotonic() - t0, 1), "acked": acked[0], "trained": trained,
            "wasted": acked[0] - trained, "wasted_share": round((acked[0] - trained) / acked[0], 4),
            "waste": waste, "steps_trained": result["steps_trained"],
            "rolled_back_steps": result["rolled_back_steps"],
            "staleness_max": max(r["staleness_max"] for r in recs),
            "eta": cfg.buffer.max_staleness, "faults": faults.killed if faults else []}


def waste_by_cause(wasted: int, rolled_back: int, counts: Counter) -> dict[str, int]:
    """``wasted`` split per cause (module docstring); ``other`` is what no counter accounts for."""
    out = {"rolled_back": rolled_back,
           **{k: v for k, v in sorted(counts.items()) if k.startswith("dropped_") and v},
           "left_in_store": counts["stored"]}
    out["other"] = wasted - sum(out.values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=at_least(1), default=200)
    ap.add_argument("--checkpoint-every", type=at_least(1), default=50)
    ap.add_argument("--checkpoint-async", action="store_true", help="trainer.checkpoint_async=true")
    ap.add_argument("--root", type=Path, default=None,
                    help="directory for both runs (a warm start there is reused)")
    args = ap.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    stamp = time.strftime("%H%M%S")
    # a failed run exits naming its logs: they stay; a finished temporary root goes
    clean = run(root / f"clean-{stamp}", args, chaos=False)
    chaos = run(root / f"chaos-{stamp}", args, chaos=True)
    if not args.root:
        shutil.rmtree(root)
    print(json.dumps({"name": "chaos_wasted_generation", "figure": chaos["wasted_share"],
                      "unit": "share of acked groups never trained",
                      "baseline": clean["wasted_share"],
                      "ratio": round(max(clean["wasted_share"], 1e-9)
                                     / max(chaos["wasted_share"], 1e-9), 2),
                      "goal": 0.5, "clean": clean, "chaos": chaos, "steps": args.steps,
                      "checkpoint_every": args.checkpoint_every,
                      "checkpoint_async": args.checkpoint_async,
                      "run_dir": str(root) if args.root else None, **load_warning()}))


if __name__ == "__main__":
    main()
