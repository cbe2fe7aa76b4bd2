"""``areal-like run``'s live progress line (launch/job.py, ``Monitor``): each new trainer record
read once."""

from __future__ import annotations

import io
import json
from pathlib import Path

from areal_like.settings.config import load_config
from areal_like.settings.schema import RunConfig, TrainerConfig
from launch.job import Monitor
from launch.rundir import SETTINGS_FILE, write_settings
from launch.topology import Topology

TOPO = Topology(host="127.0.0.1", buffer_address="", pub_address="", master_port=0, slots=(),
                rollout_cpus=None, trainer_cpus=None)


def append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def test_monitor_progress_line_reads_each_record_once_and_keeps_the_last_steps(tmp_path):
    run = tmp_path / "run"
    cfg = RunConfig(run_dir=str(run), trainer=TrainerConfig(steps=10))
    path = run / "metrics" / "trainer.jsonl"
    append(path, {"step": 1, "reward_mean": 9.0})  # an earlier invocation's step: before `since`
    mon = Monitor(cfg, TOPO, run, out=io.StringIO(), since=path.stat().st_size)
    assert "waiting for the first trainer step" in mon.progress_line()
    for step in range(2, 9):
        append(path, {"step": step, "policy_version": step, "reward_mean": step / 10})
    with path.open("a") as f:
        f.write('{"step": 9, "reward_mean"')  # being written right now
    line = mon.progress_line()
    assert "step 8/10" in line and "reward 0.600" in line  # mean of steps 4-8
    with path.open("a") as f:
        f.write(': 1.0}\n')
    append(path, {"step": 7, "policy_version": 7, "reward_mean": 0.0})  # a resume replays step 7
    line = mon.progress_line()
    assert "step 9/10" in line and "reward 0.580" in line  # steps 5, 6, 7 (replayed: 0.0), 8, 9
    assert mon.tail.offset == path.stat().st_size  # every line read once, none twice


def test_a_resumes_accepted_settings_reach_settings_yaml_with_its_first_step(tmp_path):
    """settings.yaml gets a resume's changed settings once a step trained with them: a resume that
    a daemon refuses at start (another model's checkpoint) leaves the run's settings as they
    were (they used to be written before any daemon started)."""
    run = tmp_path / "run"
    run.mkdir()
    write_settings(load_config([f"run_dir={run}", "trainer.lr=3e-4"]))
    before = (run / SETTINGS_FILE).read_text()
    changed = load_config([f"run_dir={run}", "trainer.lr=1e-3"])
    mon = Monitor(changed, TOPO, run, out=io.StringIO(), settings=changed)
    append(run / "metrics" / "trainer.jsonl", {"event": "resume", "policy_version": 2})
    mon.read()
    assert (run / SETTINGS_FILE).read_text() == before  # no step yet
    append(run / "metrics" / "trainer.jsonl", {"step": 3, "reward_mean": 0.5})
    mon.read()
    assert "  lr: 0.001\n" in (run / SETTINGS_FILE).read_text()
