"""The Python entry point (``from launch import run, config``; launch/api.py) runs the CLI's job
and returns its summary: the dict ``areal-like run`` prints as its last line and writes to
``run_dir/summary.json``. A config built in Python runs as one composed from overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from areal_like.settings.config import ConfigError
from launch import config, run

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import dataclasses, json, signal, sys
    from launch import config, run

    # a known handler to restore (a shell's background job starts with SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cfg = config("experiment=quickstart", "warm_start.steps=0", "eval.at_end=false",
                 f"run_dir={sys.argv[1]}")
    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, steps=2))
    summary = run(cfg)
    restored = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    print("API " + json.dumps({"summary": summary, "handlers_restored": restored}))
""")


def test_run_returns_the_jobs_summary(tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(run_dir)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    api = next(i for i, line in enumerate(lines) if line.startswith("API "))
    got = json.loads(lines[api][4:])
    summary = got["summary"]
    assert summary["ok"] is True and summary["steps"] == 2 and summary["trainer_steps"] == 2
    assert summary["run_dir"] == str(run_dir.resolve())
    assert summary == json.loads((run_dir / "summary.json").read_text())
    assert json.loads(lines[api - 1]) == summary  # the CLI's last line, by the same launcher
    assert got["handlers_restored"]


def test_bad_input_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer\.nope"):
        config("trainer.nope=1")
    with pytest.raises(ConfigError, match=r"trainer\.nope"):
        run("trainer.nope=1", f"run_dir={tmp_path / 'run'}")
    assert not (tmp_path / "run").exists()
    with pytest.raises(TypeError, match="RunConfig"):
        run(config(), "trainer.steps=2")
