"""Asynchronous versus synchronous RL, end to end, on the same machine in one run.

Runs the real system twice (buffer + 1 rollout server with the embedded engine + a 1-rank trainer,
under the local supervisor; configs/experiment/bench_async.yaml), once with eta = 0 (synchronous
on-policy: generation waits for the new weights, training waits for the batch) and once with eta = 4
(asynchronous). As on a GPU cluster, the rollout pool and the trainer pool get disjoint resources in
both runs: one core each, pinned with taskset (launch.pin_cpus), one thread per process.

Measured from the trainer's per-step records (after ``--skip`` warm-up steps):
* trained samples per second for each run;
* from the synchronous run, the generation phase G (the trainer waiting for its batch, which is
  the generation of a whole batch at the new version) and the training phase T (everything else
  in a step: recompute, advantages and update, weight sync, checkpoint; a record's phase_seconds
  holds only its own step's phases, so the setup's log-prob guard and an earlier checkpoint are
  not counted again, and the metrics phase that writes the record is not in it);
* achieved speedup = samples/s(eta=4) / samples/s(eta=0) and the ideal (G + T) / max(G, T).

One JSON line: figure = achieved speedup, baseline = ideal speedup, ratio = achieved / ideal
(goal >= 0.8).

    python benchmarks/bench_async.py [--steps 20] [--model tiny] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transport_report import at_least, load_warning  # noqa: E402

from areal_like.settings.config import load_config  # noqa: E402
from launch.job import job_specs, prepare  # noqa: E402
from launch.local import Supervisor  # noqa: E402
from launch.records import step_records  # noqa: E402


def run_once(run_dir: Path, eta: int, args) -> list[dict]:
    cfg = load_config([
        "experiment=bench_async", f"model={args.model}",
        f"task.max_new_tokens={args.max_new_tokens}", f"buffer.groups_per_step={args.groups}",
        f"buffer.max_staleness={eta}", f"trainer.steps={args.steps}",
        f"trainer.micro_batch_size={8 * args.groups}", f"run_dir={run_dir}",
    ])
    return run_job(cfg, run_dir, eta)


def run_job(cfg, run_dir: Path, eta: int) -> list[dict]:
    """Run ``cfg`` on the first two cores (rollout pool and trainer pool); its trainer's step
    records."""
    cpus = sorted(os.sched_getaffinity(0))[:2]
    cfg, topo, path = prepare(cfg, cpus=cpus)
    sup = Supervisor(job_specs(cfg, topo, path), run_dir, restarts=0, health_timeout_s=300,
                     echo=lambda _: None)
    code = sup.run()
    if code != 0:
        raise SystemExit(f"eta={eta} run failed: {sup.outcome}; logs in {run_dir / 'logs'}")
    return step_records(run_dir)


def throughput(recs: list[dict], skip: int) -> float:
    """Trained samples per second between the end of step ``skip`` and the end of the last step."""
    window = recs[skip:]
    return sum(r["seqs"] for r in window[1:]) / (window[-1]["time"] - window[0]["time"])


def phases(recs: list[dict], skip: int) -> tuple[float, float]:
    """(G, T): mean generation wait and mean training time per step of a synchronous run."""
    window = recs[skip + 1:]
    g = sum(r["phase_seconds"].get("fetch_batch", 0.0) for r in window) / len(window)
    t = sum(sum(v for k, v in r["phase_seconds"].items() if k != "fetch_batch")
            for r in window) / len(window)
    return g, t


def phase_means(recs: list[dict], skip: int) -> dict[str, float]:
    window = recs[skip + 1:]
    keys = sorted({k for r in window for k in r["phase_seconds"]})
    return {k: round(sum(r["phase_seconds"].get(k, 0.0) for r in window) / len(window), 3)
            for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=at_least(1), default=20)
    ap.add_argument("--skip", type=at_least(0), default=4,
                    help="warm-up steps left out of every figure")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--groups", type=at_least(1), default=8, help="groups per step (x8 samples)")
    ap.add_argument("--max-new-tokens", type=at_least(1), default=48)
    ap.add_argument("--keep", default=None, help="keep both run directories under this path")
    args = ap.parse_args()
    line = speedup_line("async_vs_sync_speedup", "bench_async_", run_once, args)
    print(json.dumps({**line, "model": args.model, "max_new_tokens": args.max_new_tokens}))


def speedup_line(name: str, prefix: str, run_once, args) -> dict:
    """Run the workload at eta = 0 and eta = 4 (``run_once(run_dir, eta, args)``, one after the
    other) and compare: figure = trained samples/s at eta 4 over eta 0, baseline = the ideal speedup
    from eta 0's measured generation and training phases, ratio = achieved / ideal."""
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs 2 cores: one for the rollout pool, one for the trainer pool")
    if not 0 <= args.skip <= args.steps - 2:
        raise SystemExit(f"--skip {args.skip} with --steps {args.steps} leaves no steps to "
                         "measure: the figures need --skip between 0 and --steps - 2")
    taken = [str(Path(args.keep) / d) for d in ("eta0", "eta4") if args.keep
             and (Path(args.keep) / d).exists()]
    if taken:  # the jobs would resume the finished runs and their old records be the figures
        raise SystemExit(f"--keep {args.keep}: {', '.join(taken)} exist from an earlier run; "
                         "choose a new directory")
    t0 = time.monotonic()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix=prefix))
    # a failed run exits naming its logs: they stay; a finished temporary root goes
    sync = run_once(root / "eta0", 0, args)
    asyn = run_once(root / "eta4", 4, args)
    if not args.keep:
        shutil.rmtree(root)
    sps_sync, sps_async = throughput(sync, args.skip), throughput(asyn, args.skip)
    g, t = phases(sync, args.skip)
    achieved, ideal = sps_async / sps_sync, (g + t) / max(g, t)
    return {
        "name": name, "figure": round(achieved, 3), "unit": "x (trained samples/s, eta=4 / eta=0)",
        "baseline": round(ideal, 3), "ratio": round(achieved / ideal, 3), "goal": 0.8,
        "samples_per_s_eta0": round(sps_sync, 2), "samples_per_s_eta4": round(sps_async, 2),
        "generation_s": round(g, 3), "training_s": round(t, 3),
        "staleness_mean_eta4": round(sum(r["staleness_mean"] for r in asyn) / len(asyn), 2),
        "phases_eta0": phase_means(sync, args.skip), "phases_eta4": phase_means(asyn, args.skip),
        "steps": args.steps, "wall_s": round(time.monotonic() - t0, 1), **load_warning(),
    }

if __name__ == "__main__":
    main()
