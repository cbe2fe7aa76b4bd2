"""The trainer's part of the GPU kit on CPU: its goal table, ``kit.py run --dry-run``, and
``tests/gpu/train_figures.py``'s phases end to end on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "gpu"))
import kit  # noqa: E402


def _result(name: str, **figures: str) -> kit.TestResult:
    return kit.TestResult(name=f"tests/gpu/test_train_throughput.py::{name}", outcome="passed",
                          seconds=1.0, figures=figures)


def test_the_goal_table_puts_each_figure_beside_its_baseline():
    results = [_result("test_packed_step_against_the_plain_hf_step",
                       train_mfu_packed="41.5 %", train_mfu_packed_baseline_plain_hf="18.25 %",
                       train_tokens_per_s_packed_ratio="1.21 x",
                       train_tokens_per_s_packed_baseline_plain_hf="5.0e+04 tokens/s")]
    rows = kit.goal_rows(results, kit.TRAINER_GOALS)
    assert rows == [
        "| train_mfu_packed | 41.5 | train_mfu_packed_baseline_plain_hf = 18.25 | >= 35 | yes |",
        "| train_mfu_1_5b |  |  | >= 40 | not measured |",
        "| train_tokens_per_s_packed_ratio | 1.21 | "
        "train_tokens_per_s_packed_baseline_plain_hf = 5e+04 | >= 1.3 | no |"]
    text = kit.render_results({}, results)
    assert "## Goals\n\n| figure | value | baseline (same run) | goal | met |\n" in text
    assert all(row in text for row in rows)
    # a run without the trainer's tests has no goal table
    other = [kit.TestResult("tests/gpu/x.py::t", "passed", 1.0, figures={"a": "1 s"})]
    assert "## Goals" not in kit.render_results({}, other)
    # the baseline alone (the packed phase failed): its goal reads "not measured"
    rows = kit.goal_rows([_result("t", train_mfu_packed_baseline_plain_hf="18 %")])
    assert rows[kit.GOALS.index(kit.TRAINER_GOALS[0])] == (
        "| train_mfu_packed |  | train_mfu_packed_baseline_plain_hf = 18 | >= 35 | not measured |")


def test_a_dry_run_lists_the_trainer_tests_and_installs_nothing(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tests/gpu/kit.py"), "run", "--dry-run",
                        "--wheelhouse", str(tmp_path / "none"), "--", "-k", "train_throughput"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    listed = [ln for ln in r.stdout.splitlines() if "::" in ln]
    assert listed == [f"tests/gpu/test_train_throughput.py::{t}" for t in (
        "test_packed_step_against_the_plain_hf_step", "test_the_1_5b_step",
        "test_the_7b_lora_step_peak_memory_against_the_estimate", "test_the_compiled_step")]


def test_every_trainer_phase_runs_on_the_tiny_model_and_a_bad_one_is_refused():
    """But compiled_0.5B (minutes of C++ on CPU; the switch: test_step_kernels.py)."""
    from tests.conftest import child_env

    phases = "packed_0.5B,plain_0.5B,packed_1.5B,lora_7B"
    r = subprocess.run([sys.executable, str(ROOT / "tests/gpu/train_figures.py"), "--device",
                        "cpu", "--tiny", "--seqs", "4", "--max-len", "48", "--budget", "96",
                        "--phases", phases],
                       capture_output=True, text=True, timeout=600, env=child_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = [json.loads(ln[7:]) for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert [x["phase"] for x in res] == phases.split(",")
    assert all("error" not in x and x["seconds"] > 0 and x["flops"] > 0 for x in res), res
    packed, plain = res[0], res[1]
    # the same log-normal batch (lengths clipped to [32, 48]) in both, cut by the budget
    assert packed["tokens"] == plain["tokens"] and 4 * 32 <= packed["tokens"] <= 4 * 48
    assert packed["micro_batches"] >= 2
    r = subprocess.run([sys.executable, str(ROOT / "tests/gpu/train_figures.py"),
                        "--phases", "packed_0.5B,bogus"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "unknown bogus" in r.stderr  # refused by name
