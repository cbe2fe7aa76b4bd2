"""A long run keeps a bounded number of checkpoints and exports, each by its own setting.

A real 6-step job (``areal-like run``, the quickstart's layout without its warm start) that
checkpoints every step and exports every 2 steps, with ``trainer.keep_checkpoints=3`` and
``export.keep=2``: the checkpoints left are the 3 newest (v4, v5, v6), the exports the 2 newest
(v4, v6); checkpoint retention never touches an export. The exported weights are readable by
whoever may read the rest of the export (not only by their owner), and ``areal-like eval`` of a
checkpoint prints one JSON line, its own.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, child_env

pytestmark = pytest.mark.slow


def test_checkpoints_and_exports_are_kept_by_their_own_counts(tmp_path):
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "launch.cli", "run", "-q", "experiment=quickstart",
                        "warm_start.steps=0", "trainer.steps=6", "trainer.checkpoint_every=1",
                        "trainer.keep_checkpoints=3", "export.every=2", "export.keep=2",
                        "eval.at_end=false", f"run_dir={run_dir}"],
                       capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env=child_env())
    assert r.returncode == 0, r.stderr[-3000:]
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    exports = sorted(p.name for p in (run_dir / "export").iterdir())
    assert checkpoints == ["v00000004", "v00000005", "v00000006"], checkpoints
    assert exports == ["v00000004", "v00000006"], exports
    export = run_dir / "export" / "v00000004"
    assert ((export / "model.safetensors").stat().st_mode & 0o777
            == (export / "config.json").stat().st_mode & 0o777)

    r = subprocess.run([sys.executable, "-m", "launch.cli", "eval",
                        str(run_dir / "checkpoints" / "v00000006"), "eval.max_examples=4",
                        "eval.k=0"], capture_output=True, text=True, timeout=300,
                       cwd=REPO_ROOT, env=child_env())
    assert r.returncode == 0, r.stderr[-3000:]
    [line] = r.stdout.splitlines()
    assert json.loads(line)["policy_version"] == 6
