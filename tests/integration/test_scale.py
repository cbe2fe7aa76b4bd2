"""``areal-like scale`` on a real job (buffer, one rollout server, one trainer rank).

rollout=2: a second server starts and its groups are acked; rollout=1: when the command returns
it holds no lease and is off the roster (600 s timeouts: only its own last heartbeat can), every
acked group accounted; trainer=2: a checkpoint at stop, resumed on two ranks with nothing rolled
back (same-loss resharding: test_trainer_reshard.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from areal_like.net.dealer import Client
from areal_like.net.metrics import scrape
from areal_like.settings.config import load_daemon_config
from areal_like.wire import protocol as P
from launch.local import probe
from launch.records import read_jsonl
from tests.conftest import REPO_ROOT, child_env, stop_process, wait_until

START_S = 240.0  # a whole job on 2 loaded cores: imports, model, engine, first health answers
SCALE_S = 240.0  # a new server imports torch and builds its engine; a trainer saves and restarts
JOB = ["experiment=quickstart", "warm_start.steps=0", "trainer.steps=100000",
       "launch.num_rollout_servers=1", "launch.trainer_ranks=1", "eval.every=0",
       "eval.at_end=false", "buffer.lease_timeout_s=600", "buffer.heartbeat_timeout_s=600",
       "trainer.checkpoint_every=50000",
       # a server generates on through weight updates: it holds leases nearly all the time
       "rollout.drain_on_update=false"]


def _cli(*args: str, timeout_s: float = SCALE_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=REPO_ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=timeout_s)


def _ports(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "ports.json").read_text())
    except (OSError, ValueError):
        return {}


def _up(run_dir: Path, names: set[str]) -> dict[str, int] | None:
    """name -> PID once ports.json lists exactly ``names``, each started and answering /health."""
    daemons = _ports(run_dir).get("daemons", [])
    if {d["name"] for d in daemons} != names or any(d["pid"] is None for d in daemons):
        return None
    return ({d["name"]: d["pid"] for d in daemons}
            if all(probe(d["health_url"]) for d in daemons) else None)


def _steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(run_dir / "metrics" / "trainer.jsonl") if "step" in r]


class Buffer:
    def __init__(self, run_dir: Path):
        cfg = load_daemon_config(["--config-file", str(run_dir / "config.yaml")])
        self.client = Client(cfg.trainer.buffer_address, timeout_s=30)

    def stats(self) -> dict:
        return self.client.request(P.StatsRequest()).values

    def roster(self) -> set[str]:
        return {m.server_id for m in self.client.request(P.RosterRequest()).members}


def _acked_accounted(stats: dict) -> None:
    """Every group the buffer acknowledged is consumed, stored, in transit or dropped by rule."""
    dropped = sum(v for k, v in stats.items() if k.startswith("groups_dropped_"))
    assert stats["groups_accepted"] == (stats["groups_consumed"] + stats["stored"]
                                        + stats["in_transit"] + dropped), stats


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_rollout_up_and_down_and_trainer_to_two_ranks_while_the_job_runs(tmp_path):
    run_dir = tmp_path / "run"
    err = (tmp_path / "stderr").open("w")
    job = subprocess.Popen([sys.executable, "-m", "launch.cli", "run", "-q", *JOB,
                            f"run_dir={run_dir}"], cwd=REPO_ROOT, env=child_env(),
                           stdout=subprocess.DEVNULL, stderr=err)
    seen: set[int] = set()
    buffer = None
    try:
        pids = wait_until(lambda: _up(run_dir, {"buffer", "rollout-0", "trainer"}), START_S,
                          0.5, "the job up")
        seen |= set(pids.values())
        buffer = Buffer(run_dir)

        up = _cli("scale", str(run_dir), "rollout=2")
        assert up.returncode == 0, up.stderr
        assert "rollout: 1 -> 2" in up.stdout
        pids = wait_until(lambda: _up(run_dir, {"buffer", "rollout-0", "rollout-1", "trainer"}),
                          30, 0.2, "ports.json with rollout-1")
        seen |= set(pids.values())
        assert _ports(run_dir)["pools"] == {"rollout": 2, "trainer": 1}
        status = _cli("status", str(run_dir))
        assert any(line.split()[:2] == ["rollout-1", "up"] for line in status.stdout.splitlines())
        top = _cli("top", str(run_dir), "--once", "--interval", "0.5")
        assert "rollout-1" in top.stdout, top.stdout
        url = next(d["metrics_url"] for d in _ports(run_dir)["daemons"] if d["name"] == "rollout-1")
        wait_until(lambda: scrape(url).get("areal_rollout_groups_acked_total", 0) > 0
                   and {"rollout-0", "rollout-1"} <= buffer.roster(), 60, 0.2,
                   "groups from rollout-1 acknowledged")
        # it leaves while it holds leases (it nearly always does: rollout.drain_on_update=false)
        wait_until(lambda: any(k.startswith("leases_of_rollout-1") for k in buffer.stats()), 30,
                   0.05, "rollout-1 holding leases")

        down = _cli("scale", str(run_dir), "rollout=1")
        assert down.returncode == 0, down.stderr
        stats = buffer.stats()
        assert not any(k.startswith("leases_of_rollout-1") for k in stats), stats
        assert buffer.roster() == {"rollout-0"}
        assert "left the buffer's roster" in (run_dir / "logs" / "rollout-1.log").read_text()
        assert not psutil.pid_exists(pids["rollout-1"]) or psutil.Process(
            pids["rollout-1"]).status() == psutil.STATUS_ZOMBIE
        assert "rollout-1" not in {d["name"] for d in _ports(run_dir)["daemons"]}
        _acked_accounted(stats)
        at = max(_steps(run_dir))
        wait_until(lambda: max(_steps(run_dir)) >= at + 3, 120, 0.2, "steps on one server")

        two = _cli("scale", str(run_dir), "trainer=2")
        assert two.returncode == 0, two.stderr
        assert "restarted on 2 ranks from checkpoint v" in two.stdout, two.stdout
        resume = [r for r in read_jsonl(run_dir / "metrics" / "trainer.jsonl")
                  if r.get("event") == "resume"][-1]
        before = max(s for s in _steps(run_dir) if s <= resume["checkpoint_version"])
        assert f"restarted on 2 ranks from checkpoint v{resume['checkpoint_version']:08d}" \
            in two.stdout, two.stdout
        # the checkpoint the stop saved: the last step trained, nothing rolled back
        assert resume["checkpoint_version"] == before >= at + 3, resume
        assert resume["rolled_back_steps"] == 0, resume
        start = (run_dir / "logs" / "trainer.log").read_text().split("---- start ")[-1]
        assert "--nproc-per-node 2" in start.splitlines()[0]
        wait_until(lambda: max(_steps(run_dir)) >= before + 3, 180, 0.2, "steps on two ranks")
        seen |= {p.pid for p in psutil.Process(job.pid).children(recursive=True)}
        _acked_accounted(buffer.stats())

        stop = _cli("stop", str(run_dir))
        assert stop.returncode == 0, stop.stderr
        assert job.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if buffer is not None:
            buffer.client.close()
        stop_process(job)
        err.close()
        left = [p for p in seen if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"
