"""A real job over the multi-node path, on one machine: `areal-like run -q` with
``security.local_ipc=false``, so every daemon reaches the buffer over tcp with CURVE, and every
weight group's rendezvous goes through rank 0's store gate and the members' doors
(areal_like/net/store_gate.py). 2 rollout servers (embedded engines), 1 trainer rank.
"""

from __future__ import annotations

import json

import pytest
import yaml
from test_eval_export import live_children, run_job

# long enough that an engine that starts seconds later under load still joins several syncs
STEPS = 40

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
def test_a_job_over_tcp_with_curve_and_gated_rendezvous(tmp_path):
    run_dir = tmp_path / "run"
    before = live_children()
    r = run_job(run_dir, f"trainer.steps={STEPS}", "security.local_ipc=false",
                "launch.num_rollout_servers=2",
                "launch.trainer_ranks=1", "eval.max_examples=64")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["steps"] == STEPS, summary
    assert live_children() == before

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["rollout"]["buffer_address"].startswith("tcp://"), cfg["rollout"]["buffer_address"]
    assert cfg["trainer"]["buffer_address"].startswith("tcp://") and cfg["security"]["curve"]
    logs = {p.name: p.read_text() for p in (run_dir / "logs").glob("*.log")}
    assert all("CURVE on" in logs[f"{d}.log"]
               for d in ("buffer", "rollout-0", "rollout-1")), list(logs)
    # handshakes and gates only
    refusals = [line for text in logs.values() for line in text.splitlines()
                if any(m in line for m in ("StoreGate refused", "StoreDoor refused", "store gate"))]
    assert not refusals, refusals[:5]

    records = [json.loads(line)
               for line in (run_dir / "metrics" / "trainer.jsonl").read_text().splitlines()]
    steps = [rec for rec in records if "step" in rec]
    assert [rec["step"] for rec in steps] == list(range(1, STEPS + 1))
    syncs = [rec["weight_sync"] for rec in steps
             if rec.get("weight_sync", {}).get("version", 0) >= 1]
    # a member that failed the gate is dropped
    assert all(not s["dropped"] and s["done"] for s in syncs), syncs
    # a server that registers late (its engine slow to start) joins the roster at a later version;
    # from the first sync both did, both do every one
    both = [sorted(s["done"]) == ["rollout-0", "rollout-1"] for s in syncs]
    registered = [line.split("rollout: ", 1)[1] for d in ("rollout-0", "rollout-1")
                  for line in logs[f"{d}.log"].splitlines() if "registered with the buffer" in line]
    assert True in both and all(both[both.index(True):]), (
        registered, [(s["version"], s["done"]) for s in syncs])
    assert summary["eval_last"]["greedy_accuracy"] >= 0.5, summary["eval_last"]
