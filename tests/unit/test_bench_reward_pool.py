"""benchmarks/bench_reward_pool.py measures what its docstring says: 2 sandboxed workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_pool_scores_in_two_workers_and_prints_one_full_line():
    # a pool of 0 workers (in-process scoring) would measure nothing of what the line claims
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_reward_pool.py"),
                          "--rounds", "1"], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True)
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["workers"] == 2
    assert {"name", "figure", "unit", "baseline", "ratio", "goal"} <= line.keys()
