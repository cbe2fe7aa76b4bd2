"""tests/gpu/kit.py without a GPU: the wheelhouse, the junit -> RESULTS.md writer, the CLI."""

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
