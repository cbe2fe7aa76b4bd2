"""Resuming a run with other settings shows what changed and refuses unless asked.

A real 6-step job keeps the 3 newest checkpoints and 2 newest exports (readable exported weights;
one INFO line for the first sync). Then on its run_dir: lr changed is refused naming it (steps is
not listed); a shape change the checkpoint cannot fit is refused by the launcher, one line; a change
the trainer refuses leaves config.yaml and settings.yaml as they were; --accept-changes resumes,
says what changed and stores it; eval of the last checkpoint prints one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

JOB_S = 300.0  # one tiny job on 2 loaded cores


def _run(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """``areal-like run -q``; past JOB_S the launcher and everything under it is killed by PID."""
    return run_cli("run", "-q", "experiment=quickstart", "warm_start.steps=0",
                "trainer.checkpoint_every=1", "trainer.keep_checkpoints=3", "export.every=2",
                "export.keep=2", "eval.at_end=false", f"run_dir={run_dir}", *args, timeout=JOB_S)


def test_a_resume_with_changed_settings_is_refused_unless_accepted(tmp_path):
    run_dir = tmp_path / "run"
    first = _run(run_dir, "trainer.steps=6", "trainer.lr=3e-4")
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    exports = sorted(p.name for p in (run_dir / "export").iterdir())
    assert checkpoints == ["v00000004", "v00000005", "v00000006"], checkpoints
    assert exports == ["v00000004", "v00000006"], exports
    export = run_dir / "export" / "v00000004"
    assert ((export / "model.safetensors").stat().st_mode & 0o777
            == (export / "config.json").stat().st_mode & 0o777)
    syncs = [ln for ln in (run_dir / "logs" / "rollout-0.log").read_text().splitlines()
             if "weight sync v" in ln]
    assert len(syncs) == 1 and "INFO" in syncs[0] and "weight sync v0 done" in syncs[0], syncs

    refused = _run(run_dir, "trainer.steps=8", "trainer.lr=1e-3")
    assert refused.returncode == 2 and refused.stdout == "", refused.stderr[-3000:]
    assert refused.stderr.splitlines() == [
        f"error: run_dir {run_dir} was run with other settings; resuming would change 1:",
        "error:   trainer.lr: 0.0003 -> 0.001",
        "error: add --accept-changes to resume with them, or use a new run_dir"]

    files = [run_dir / "settings.yaml", run_dir / "config.yaml"]
    before = [f.read_text() for f in files]
    misfit = _run(run_dir, "--accept-changes", "trainer.steps=8", "trainer.lr=3e-4",
                  "model.intermediate_size=512")
    assert misfit.returncode == 2 and misfit.stdout == "", misfit.stderr[-3000:]
    [line] = misfit.stderr.splitlines()
    assert line.startswith(f"error: {run_dir}/checkpoints/v00000006 holds another model's "
                           "weights ("), line
    assert line.endswith("these settings changed it (model.intermediate_size: 256 -> 512): "
                         "resume without those changes, or use a new run_dir"), line
    assert [f.read_text() for f in files] == before  # it never ran with them

    data = run_dir / "checkpoints" / "v00000006" / "__0_0.distcp"
    whole = data.read_bytes()
    os.truncate(data, len(whole) // 2)
    damaged = _run(run_dir, "--accept-changes", "trainer.steps=8", "trainer.lr=1e-3")
    assert damaged.returncode == 2, damaged.stderr[-3000:]  # a refusal
    assert damaged.stderr.splitlines()[-2].startswith(
        f"error: checkpoint {run_dir}/checkpoints/v00000006 cannot be read ("), damaged.stderr
    assert [f.read_text() for f in files] == before
    data.write_bytes(whole)

    accepted = _run(run_dir, "--accept-changes", "trainer.steps=8", "trainer.lr=1e-3")
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert "[run] resuming with a changed setting: trainer.lr: 0.0003 -> 0.001" in accepted.stderr
    summary = json.loads(accepted.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["resumed_from"] == 6
    assert "  lr: 0.001\n" in (run_dir / "config.yaml").read_text()
    assert "  lr: 0.001\n" in (run_dir / "settings.yaml").read_text()

    evaluated = run_cli("eval", str(run_dir / "checkpoints" / "v00000008"), "eval.max_examples=4",
                        "eval.k=0", timeout=JOB_S)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    [line] = evaluated.stdout.splitlines()
    assert json.loads(line)["policy_version"] == 8


def test_a_run_stopped_before_its_final_evaluation_does_it_when_run_again(tmp_path):
    """A rerun trains nothing, evaluates, ends ok (then refused: test_rundir.py)."""
    run_dir = tmp_path / "run"
    args = ("run", "-q", "experiment=quickstart", "warm_start.steps=0", "trainer.steps=2",
            "eval.max_examples=8", "eval.k=0", f"run_dir={run_dir}")
    first = run_cli(*args, timeout=JOB_S)
    assert first.returncode == 0, first.stderr[-3000:]
    evals = run_dir / "eval.jsonl"
    assert [json.loads(x)["final"] for x in evals.read_text().splitlines()] == [True]
    evals.unlink()  # as if stopped while it ran

    again = run_cli(*args, timeout=JOB_S)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["steps"] == 0 and summary["resumed_from"] == 2, summary
    assert summary["eval_last"]["policy_version"] == 2 and summary["eval_last"]["final"], summary
