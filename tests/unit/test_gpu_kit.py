"""tests/gpu/kit.py without a GPU: the wheelhouse, the junit -> RESULTS.md writer, the CLI, the
goals, results merged per commit, the MFU FLOP count, the phases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "gpu"))
import kit  # noqa: E402
import train_figures  # noqa: E402

SAMPLE_JUNIT = ("""<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="3" time="42.0">
<testcase classname="tests.gpu.test_throughput" name="test_generated_tokens_per_second" time="12.5">
  <properties><property name="figure:generated_tokens_per_s" value="1.234e+04 tokens/s"/>
  <property name="other" value="x"/></properties></testcase>
<testcase classname="tests.gpu.test_fsdp_bf16" name="test_fsdp2_bf16_train_step_on_cuda" """
                """time="20.25">
  <failure message="AssertionError: assert 0.5 == 0.1 | see log">Traceback ...</failure></testcase>
<testcase classname="tests.gpu.test_sglang_real" name="test_real_sglang" time="0.01">
  <skipped type="pytest.skip" message="sglang is not installed">skip</skipped></testcase>
</testsuite></testsuites>
""")
ENV = {"date": "2026-11-22 18:00 UTC", "gpu": "NVIDIA H100 80GB HBM3", "driver": "580.159.04",
       "torch": "2.11.0+cu130", "cuda": "13.0", "nccl": "2.27.7", "python": "3.12.3",
       "commit": "abc1234"}


def test_every_dependency_is_carried_or_in_the_gpu_image_at_the_version_pyproject_pins(tmp_path):
    assert kit.missing_requirements(ROOT / "pyproject.toml") == []
    fake = tmp_path / "pyproject.toml"
    fake.write_text('[project]\nname = "x"\n'
                    'dependencies = ["hydra-core>=1.3", "Foo_Bar>=1", "torch"]\n'
                    '[project.optional-dependencies]\ntest = ["x[y]", "pytest"]\n')
    assert kit.missing_requirements(fake) == ["foo-bar"]
    # and the versions pyproject pins
    assert kit.pin_mismatches(ROOT / "pyproject.toml") == []
    assert kit.WHEELS["transformers"] == "5.19.0" and "transformers" not in kit.IMAGE_HAS
    fake.write_text('[project]\nname = "x"\n'
                    'dependencies = ["torch==9", "Foo_Bar==1.2", "hydra-core==1.3.8", '
                    '"msgspec==0.1", "pyzmq>=1"]\n')
    assert kit.pin_mismatches(fake) == ["Foo_Bar==1.2: the kit carries nothing",
                                        "msgspec==0.1: the kit carries 0.22.0"]


def test_wheelhouse_commands(tmp_path):
    download, build = kit.wheelhouse_commands(tmp_path / "w", python="py")
    assert download[:10] == ["py", "-m", "pip", "download", "--no-deps",
                             "--only-binary=:all:", "--python-version",
                             "3.12", "--implementation", "cp"]
    assert download[download.index("-d") + 1] == str(tmp_path / "w")
    assert "hydra-core==1.3.8" in download and "pyzmq==27.3.0" in download
    assert not any(a.startswith("antlr4") for a in download)  # no wheel on PyPI: built instead
    assert build == ["py", "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "w"),
                     "antlr4-python3-runtime==4.9.3"]


def test_check_wheelhouse_names_what_is_missing_or_another_version(tmp_path):
    for name, version in kit.WHEELS.items():
        (tmp_path / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"")
    assert kit.check_wheelhouse(tmp_path) == []
    (tmp_path / "pyzmq-27.3.0-py3-none-any.whl").unlink()
    (tmp_path / "dill-0.4.1-py3-none-any.whl").rename(tmp_path / "dill-0.3.9-py3-none-any.whl")
    assert kit.check_wheelhouse(tmp_path) == ["pyzmq==27.3.0: missing",
                                              "dill==0.4.1: found dill-0.3.9-py3-none-any.whl"]
    (tmp_path / "dill-0.4.1-py3-none-any.whl").write_bytes(b"")
    with pytest.raises(ValueError, match="two wheels of dill"):
        kit.check_wheelhouse(tmp_path)


def test_results_md_from_a_sample_junit_report(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(SAMPLE_JUNIT)
    results = kit.parse_junit(junit)
    assert [(r.name, r.outcome, r.seconds) for r in results] == [
        ("tests/gpu/test_throughput.py::test_generated_tokens_per_second", "passed", 12.5),
        ("tests/gpu/test_fsdp_bf16.py::test_fsdp2_bf16_train_step_on_cuda", "failed", 20.25),
        ("tests/gpu/test_sglang_real.py::test_real_sglang", "skipped", 0.01)]
    assert results[0].figures == {"generated_tokens_per_s": "1.234e+04 tokens/s"}
    text = kit.render_results(ENV, results)
    assert "| gpu | NVIDIA H100 80GB HBM3 |" in text and "| nccl | 2.27.7 |" in text
    assert "| result | 1 passed, 1 failed, 1 skipped (33 s) |" in text
    assert ("| `tests/gpu/test_fsdp_bf16.py::test_fsdp2_bf16_train_step_on_cuda` | failed | 20.2 | "
            "AssertionError: assert 0.5 == 0.1 \\| see log |") in text
    assert ("| `tests/gpu/test_sglang_real.py::test_real_sglang` | skipped | 0.0 | "
            "sglang is not installed |") in text
    assert ("## Figures\n\n| test | figure | value |\n|---|---|---|\n"
            "| `tests/gpu/test_throughput.py::test_generated_tokens_per_second` | "
            "generated_tokens_per_s | "
            "1.234e+04 tokens/s |\n\n## Goals\n") in text
    # an engine figure with a goal: judged against the absolute one, its baseline not measured
    assert "| generated_tokens_per_s | 1.234e+04 |  | >= 5028 | yes |" in text


def test_the_figure_fixture_reaches_the_report_through_a_real_junit_file(tmp_path):
    (tmp_path / "test_fig.py").write_text("def test_fast(figure):\n"
                                          "    figure('speed', 1234.5678, 'tokens/s')\n")
    junit = tmp_path / "junit.xml"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-o", "addopts=",
                        "-o", "junit_family=xunit1", f"--junitxml={junit}", f"--rootdir={tmp_path}",
                        str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ,
                            "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "gpu"),
                                                           str(ROOT)])})
    assert r.returncode == 0, r.stdout + r.stderr
    (result,) = kit.parse_junit(junit)
    assert (result.outcome, result.figures) == ("passed", {"speed": "1235 tokens/s"})


def test_a_run_past_its_budget_still_reports_the_tests_that_finished(tmp_path):
    (tmp_path / "test_two.py").write_text(
        "import threading\n"
        "def test_quick():\n    pass\n"
        "def test_hangs():\n    threading.Event().wait()\n")
    junit = tmp_path / "junit.xml"
    code, stopped = kit.run_pytest(["-q", "-o", "addopts=", "-o", "junit_family=xunit1",
                                    "-p", "no:cacheprovider", f"--junitxml={junit}",
                                    f"--rootdir={tmp_path}", str(tmp_path)],
                                   dict(os.environ), budget_s=30, cwd=tmp_path)
    assert stopped and code == 2  # pytest's "interrupted"
    assert [(r.name.rsplit("::")[-1], r.outcome) for r in kit.parse_junit(junit)] == [
        ("test_quick", "passed")]
    note = "stopped at the 30 s budget"
    assert note in kit.render_results(ENV, kit.parse_junit(junit), note)


def test_command_line(tmp_path):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "tests/gpu/kit.py"), *args],
                              capture_output=True, text=True, timeout=120)

    r = cli("run", "--wheelhouse", str(tmp_path / "none"), "--out", str(tmp_path / "out"))
    assert (r.returncode == 2 and "the wheelhouse is incomplete" in r.stderr
            and "none: no such folder" in r.stderr)
    assert not (tmp_path / "out").exists()  # nothing installed, nothing run
    (tmp_path / "junit.xml").write_text(SAMPLE_JUNIT)
    (tmp_path / "env.json").write_text(json.dumps(ENV))
    r = cli("report", str(tmp_path / "junit.xml"), "--env", str(tmp_path / "env.json"),
            "--results", str(tmp_path / "RESULTS.md"))
    assert r.returncode == 0, r.stderr
    assert ((tmp_path / "RESULTS.md").read_text()
            == kit.render_results(ENV, kit.parse_junit(tmp_path / "junit.xml")))
    assert cli("bogus").returncode == 2
    r = cli("run", "--budget-s", "-1")
    assert r.returncode == 2 and "--budget-s -1.0: expected a finite number" in r.stderr


def _r(name: str, outcome: str = "passed", **figures: str) -> kit.TestResult:
    return kit.TestResult(name=f"tests/gpu/t.py::{name}", outcome=outcome, seconds=1.0,
                          figures=figures)


def test_the_four_goals_are_in_the_table():
    bounds = {(g.figure, g.bound()) for g in kit.GOALS}
    assert {("generated_tokens_per_s", ">= generated_tokens_per_s_baseline_hf_static"),
            ("generated_tokens_per_s", ">= 5028"), ("train_mfu_packed", ">= 35"),
            ("train_mfu_1_5b", ">= 40"), ("weight_sync_ipc_s", "<= 0.02"),
            ("weight_sync_ipc_last_s", "<= 0.02"), ("gpu_busy_share", ">= 70")} <= bounds


def test_at_least_at_most_and_against_a_baseline_figure():
    most = kit.Goal("sync_s", at_most=0.02)
    assert kit.goal_met(most, {"sync_s": 0.02}) is True
    assert kit.goal_met(most, {"sync_s": 0.021}) is False
    assert kit.goal_met(most, {}) is None
    least = kit.Goal("mfu", at_least=35.0)
    assert (kit.goal_met(least, {"mfu": 35.0}), kit.goal_met(least, {"mfu": 34.9})) == (True, False)
    both = kit.Goal("x", at_least=1.0, at_most=2.0)
    assert [kit.goal_met(both, {"x": v}) for v in (0.5, 1.5, 2.5)] == [False, True, False]
    rel = kit.Goal("tps", at_least_figure="tps_baseline")
    assert kit.goal_met(rel, {"tps": 12810.0, "tps_baseline": 12810.0}) is True
    assert kit.goal_met(rel, {"tps": 2415.0, "tps_baseline": 12810.0}) is False
    assert kit.goal_met(rel, {"tps": 2415.0}) is None  # the baseline did not run: not judged


def test_goal_rows_read_as_the_report_shows_them():
    results = [_r("engine", generated_tokens_per_s="2415 tokens/s",
                  generated_tokens_per_s_baseline_hf_static="1.281e+04 tokens/s"),
               _r("ipc", weight_sync_ipc_s="0.05381 s", weight_sync_ipc_last_s="0.019 s",
                  weight_sync_ipc_s_baseline="0.0006787 s")]
    goals = kit.ENGINE_GOALS + kit.SYNC_GOALS + kit.SYSTEM_GOALS
    assert kit.goal_rows(results, goals) == [
        "| generated_tokens_per_s | 2415 | generated_tokens_per_s_baseline_hf_static = 1.281e+04 "
        "| >= generated_tokens_per_s_baseline_hf_static | no |",
        "| generated_tokens_per_s | 2415 |  | >= 5028 | no |",
        "| weight_sync_ipc_s | 0.05381 | weight_sync_ipc_s_baseline = 0.0006787 | <= 0.02 | no |",
        "| weight_sync_ipc_last_s | 0.019 |  | <= 0.02 | yes |",
        "| gpu_busy_share |  |  | >= 70 | not measured |"]


def test_results_of_two_calls_on_one_commit_are_merged():
    env1 = {"commit": "abc1234", "date": "2026-11-27 14:46 UTC", "torch": "2.11.0+cu130"}
    env2 = {**env1, "date": "2026-11-27 14:55 UTC"}
    first = kit.make_record(env1, [_r("a", speed="1 x"), _r("b", "failed")], "",
                            ["-k", "a or b"])
    second = kit.make_record(env2, [_r("b", speed2="2 x"), _r("c")], "stopped at the budget",
                             ["-k", "b or c"])
    merged = kit.merge_records(first, second)
    rows = [(r["name"].split("::")[1], r["outcome"], r["figures"]) for r in merged["results"]]
    assert rows == [("a", "passed", {"speed": "1 x"}), ("b", "passed", {"speed2": "2 x"}),
                    ("c", "passed", {})]
    assert [c["selection"] for c in merged["calls"]] == ["-k a or b", "-k b or c"]
    text = kit.render_record(merged)
    assert "| result | 3 passed (3 s); stopped at the budget |" in text
    assert ("Merged from 2 calls on this commit:\n\n"
            "1. 2026-11-27 14:46 UTC: `-k a or b`\n"
            "2. 2026-11-27 14:55 UTC: `-k b or c` (stopped at the budget)\n") in text
    assert "on torch 2.11.0+cu130, the machine's own" in text
    # another commit's record is replaced, not merged
    other = kit.make_record({**env2, "commit": "def5678"}, [_r("c")])
    assert kit.merge_records(first, other) == other
    assert kit.merge_records(None, first) == first


def test_a_call_merges_into_the_newest_record_of_its_commit():
    env = {"commit": "abc", "date": "2026-11-27 15:00 UTC"}
    one = kit.make_record({**env, "date": "2026-11-27 14:00 UTC"}, [_r("a")])
    one["profiles"] = ["profiles/profile_decode.txt"]
    two = kit.merge_records(one, kit.make_record({**env, "date": "2026-11-27 14:30 UTC"},
                                                 [_r("b")]))
    new = kit.make_record(env, [_r("c")])
    new["profiles"] = ["profiles/profile_train_packed_0.5B.txt"]
    other = kit.make_record({**env, "commit": "zzz"}, [_r("z")])
    got = kit.merge_with_previous(new, [one, None, two, other])
    assert [r["name"][-1] for r in got["results"]] == ["a", "b", "c"]
    assert len(got["calls"]) == 3
    assert got["profiles"] == ["profiles/profile_decode.txt",
                               "profiles/profile_train_packed_0.5B.txt"]
    assert kit.merge_with_previous(new, [other, None]) is new


def test_a_record_round_trips_through_its_file(tmp_path):
    record = kit.make_record({"commit": "abc", "date": "d"}, [_r("a", x="1 s")])
    record["profiles"] = ["profiles/profile_decode.txt"]
    (tmp_path / "out").mkdir()
    kit.write_record(record, tmp_path / "out", tmp_path / "RESULTS.md")
    assert kit.load_record(tmp_path / "results.json") == record
    assert kit.load_record(tmp_path / "out" / "results.json") == record
    assert "- `profiles/profile_decode.txt`" in (tmp_path / "RESULTS.md").read_text()
    (tmp_path / "bad.json").write_text("{")
    assert kit.load_record(tmp_path / "bad.json") is None
    assert kit.load_record(tmp_path / "none.json") is None


def test_train_flops_counts_the_output_head_on_output_tokens_only():
    # 2 layers, hidden 4, vocab 10, 100 parameters per block; one sequence of 3 prompt + 2 output
    # tokens: blocks 6*100*2*5 = 6000, head 6*10*4*2 = 480, attention 12*2*4*5*5 = 2400
    assert kit.train_flops(2, 4, 10, 100, [(3, 2)]) == 6000 + 480 + 2400
    # sums over sequences; a sequence without output tokens runs no head
    assert kit.train_flops(2, 4, 10, 100, [(3, 2), (5, 0)]) == 8880 + 6000 + 2400
    # the 0.5B shape on 8 x 2048 tokens with 64-token prompts: the head on all tokens would be
    # the old count, more than this one by the prompt tokens' head work
    from launch.memory import block_params, qwen2_shape

    cfg = qwen2_shape("0.5B")
    new = kit.train_flops(cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size,
                          block_params(cfg), [(64, 1984)] * 8)
    head_on_prompts = 6 * cfg.vocab_size * cfg.hidden_size * 64 * 8
    old = new + head_on_prompts
    assert old / new > 1.0 and head_on_prompts == 6 * 151936 * 896 * 512


def test_the_selected_trainer_tests_choose_the_phases():
    assert train_figures.phases_for(["test_packed_step_against_the_plain_hf_step"]) == [
        "packed_0.5B", "plain_0.5B"]
    assert train_figures.phases_for(["test_the_compiled_step"]) == ["packed_0.5B"]
    both = ["test_the_1_5b_step", "test_packed_step_against_the_plain_hf_step"]
    assert train_figures.phases_for(both) == ["packed_0.5B", "plain_0.5B", "packed_1.5B"]
    assert train_figures.phases_for(list(train_figures.NEEDS)) == [
        "packed_0.5B", "plain_0.5B", "packed_1.5B", "lora_7B"]
    assert train_figures.phases_for(["test_other"]) == []
