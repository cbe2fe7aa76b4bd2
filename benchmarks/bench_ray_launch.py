"""What Ray adds to a job: ``areal-like run launch.cluster=ray`` against ``areal-like run`` for
the same job on the same machine.

The job: the quickstart-sized CPU job (buffer, one trainer rank, two rollout servers with embedded
engines; ``--steps`` steps, no warm start, no evaluation), on one node either way, so that the
processes and their layout are the same and only the launcher differs: Ray's connection, the
placement group and its shared-storage probe, one proxy process and one actor per daemon. The Ray
cluster (one local node, ``ray.cluster_utils.Cluster``) is started before the timings, as a user's
cluster would be. Rounds alternate the two launchers.

Two JSON lines (medians over ``--rounds``):

* ``ray_launch_first_step``: seconds from the command to the first trained step's record on Ray
  (``figure``) and with ``run`` (``baseline``), ``ratio`` = figure / baseline, ``added_s`` = their
  difference; goal: Ray adds at most 20 s;
* ``ray_launch_samples_per_s``: trained samples per second between step 5 and the last step on Ray
  (``figure``) and with ``run`` (``baseline``), ``ratio`` = figure / baseline; goal >= 0.95.

A ``warning`` field when the machine is loaded (then absolute figures are noisy).

Run: ``python benchmarks/bench_ray_launch.py [--rounds 2] [--steps 40]``
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from transport_report import at_least, load_warning  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
JOB = ["launch.nodes=1", "launch.trainer_ranks=1", "launch.num_rollout_servers=2",
       "warm_start.steps=0", "eval.every=0", "eval.at_end=false"]
FIRST_STEP_GOAL_S = 20.0
SAMPLES_GOAL = 0.95
SKIP = 5  # steps before the throughput window (first pushes, warm caches)


def one_job(ray: bool, steps: int, root: Path, address: str) -> tuple[float, float]:
    """(seconds from the command to step 1's record, samples/s from step SKIP to the last)."""
    run_dir = root / f"{'ray' if ray else 'run'}-{time.monotonic_ns()}"
    argv = [sys.executable, "-m", "launch.cli", "run", "-q", *JOB, f"trainer.steps={steps}",
            f"run_dir={run_dir}", *(["launch.cluster=ray"] if ray else [])]
    env = {**os.environ, "RAY_ADDRESS": address, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t0 = time.time()
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise SystemExit(f"{'ray' if ray else 'run'} job failed:\n{done.stderr[-3000:]}")
    from launch.records import step_records

    steps_ = step_records(run_dir)
    window = [r for r in steps_ if r["step"] >= SKIP]
    seqs = sum(r["seqs"] for r in window[1:])
    return steps_[0]["time"] - t0, seqs / (window[-1]["time"] - window[0]["time"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=at_least(1), default=1)
    ap.add_argument("--steps", type=at_least(SKIP + 2), default=40)
    args = ap.parse_args()
    results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as root:
        # Ray's token authentication, which the launcher requires (launch/RAY.md): the cluster's
        # nodes and the jobs inherit it from this process's environment, set before Ray's import
        token = Path(root) / "auth_token"
        token.touch(mode=0o600)
        token.write_text(secrets.token_hex(32))
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True,
                          head_node_args={"num_cpus": 4, "include_dashboard": False})
        try:
            for _ in range(args.rounds):
                for ray in (True, False):
                    results[ray].append(one_job(ray, args.steps, Path(root), cluster.address))
        finally:
            cluster.shutdown()
    first, rate = ({ray: statistics.median(r[i] for r in results[ray]) for ray in (True, False)}
                   for i in (0, 1))
    warn = load_warning()
    print(json.dumps({"name": "ray_launch_first_step", "figure": round(first[True], 2),
                      "unit": "s", "baseline": round(first[False], 2),
                      "ratio": round(first[True] / first[False], 3),
                      "added_s": round(first[True] - first[False], 2),
                      "goal": f"added_s <= {FIRST_STEP_GOAL_S:g}", "rounds": args.rounds,
                      **warn}), flush=True)
    print(json.dumps({"name": "ray_launch_samples_per_s", "figure": round(rate[True], 1),
                      "unit": "samples/s", "baseline": round(rate[False], 1),
                      "ratio": round(rate[True] / rate[False], 3), "goal": SAMPLES_GOAL,
                      "steps": args.steps, "rounds": args.rounds, **warn}), flush=True)


if __name__ == "__main__":
    main()
