"""``areal-like eval`` of an export moved out of its run scores its own task, or refuses.

One worker exports the tiny model with its task (sort) and without (bare). With the real CLI: the
stored task is scored (overrides apply); the bare one is refused in one line unless task= names it;
LoRA merged/ exports find their run; an unwritable --out or a refused split is one error line.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, child_env

pytestmark = pytest.mark.slow

EXPORT = """
import sys
from pathlib import Path
from areal_like.settings.config import export_yaml, load_config
from areal_like.weights.hf import build_model
from areal_like.tasks.tokenizer import load_tokenizer
from trainer.export import export_hf
root = Path(sys.argv[1])
cfg = load_config(["task=sort"])
model, tok = build_model(cfg.model, dtype="float32"), load_tokenizer(cfg.model)
export_hf(model, root / "bare" / "v00000003", model_cfg=cfg.model, tokenizer=tok, shard_mb=64,
          dtype="float32")
export_hf(model, root / "moved" / "v00000003", model_cfg=cfg.model, tokenizer=tok, shard_mb=64,
          dtype="float32", task_file=export_yaml(cfg.task))
"""
# four greedy answers: the task is the point, not the score
FAST = ["eval.max_examples=4", "eval.k=0"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Path:
    """EXPORT's two exports, made once: moved/ and bare/ (copied, never changed)."""
    root = tmp_path_factory.mktemp("exports")
    subprocess.run([sys.executable, "-c", EXPORT, str(root)], check=True, timeout=300,
                   cwd=REPO_ROOT, env=child_env())
    return root


def _eval(model: Path, *overrides: str, fast: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", "eval", str(model),
                           *(FAST if fast else ()), *overrides], capture_output=True, text=True,
                          timeout=300, cwd=REPO_ROOT, env=child_env())


def _moved(exports: Path, to: Path, task_file: str) -> Path:
    """A copy of the moved export at to (no run config.yaml near) storing task_file."""
    from areal_like.settings.config import EXPORT_TASK_FILE

    shutil.copytree(exports / "moved" / "v00000003", to)
    (to / EXPORT_TASK_FILE).write_text(task_file)
    return to


def _record(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip())


def test_an_export_is_scored_on_its_stored_task_and_a_bare_model_is_refused(exports,
                                                                              tmp_path):
    moved, bare = exports / "moved" / "v00000003", exports / "bare" / "v00000003"

    # rollout.engine.host: a multi-node run's engine address, not this machine's (TEST-NET-1);
    # eval's own engine binds loopback (before: a traceback, cannot assign requested address)
    # overrides after ``--out FILE`` reach the config (before: 'unrecognized arguments', argparse
    # had given the positionals out before the flag)
    out = tmp_path / "e.jsonl"
    record = _record(_eval(moved, "--out", str(out), "task.max_new_tokens=5",
                           "rollout.engine.host=192.0.2.1"))
    assert record["task"] == "sort" and record["n"] == 4 and record["policy_version"] == 3
    assert record["sampling"]["max_new_tokens"] == 5 and json.loads(out.read_text()) == record

    r = _eval(bare)
    assert r.returncode == 2 and r.stdout == ""
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "does not say which task to score it on" in errors[0], r.stderr
    assert "Traceback" not in r.stderr  # the task named, it is scored: the test below


def test_an_unwritable_out_file_or_a_split_the_engine_refuses_is_one_error_line(exports,
                                                                                 tmp_path):
    # the out file: the evaluation is not lost, it goes to stdout
    r = _eval(exports / "moved" / "v00000003", "--out", str(tmp_path), "task.max_new_tokens=5")
    assert r.returncode == 2
    record = json.loads(r.stdout)
    assert record["policy_version"] == 3 and record["sampling"]["max_new_tokens"] == 5, r.stdout
    lines = r.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("[eval] sampling at temperature "), r.stderr
    assert lines[1].startswith(f"error: --out {tmp_path}: "), r.stderr
    r = _eval(exports / "moved" / "v00000003", "task.top_k=0")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: /generate: HTTP 400: every eval prompt failed; the first: "
                               "'top_k must be"), r.stderr
    assert r.stderr.count("\n") == 1, r.stderr


def test_an_export_away_from_its_run_is_evaluated_with_the_runs_eval_settings_and_version(
        exports, tmp_path):
    """A moved export uses its stored eval.*, seed and version; overrides win; old as before."""
    from areal_like.settings.config import EvalConfig, TaskConfig, export_yaml
    from rollout_server.evaluate import sampling_settings

    run_eval = EvalConfig(k=2, max_examples=3, temperature=0.5, max_new_tokens=7)
    final = _moved(exports, tmp_path / "final", export_yaml(TaskConfig(name="sort"), run_eval,
                                                            seed=7, policy_version=12))
    answers = {}
    for seed in ([], ["seed=7"], ["seed=1"]):  # the stored seed is 7; one given wins
        out = tmp_path / f"samples{seed}.jsonl"
        record = _record(_eval(final, "eval.k=1", *seed, "--samples", str(out), fast=False))
        assert (record["policy_version"], record["n"], record["k"]) == (12, 3, 1), record
        assert record["sampling"]["temperature"] == 0.5, record
        assert record["sampling"]["max_new_tokens"] == 7, record
        answers[tuple(seed)] = out.read_text()
    assert answers[()] == answers[("seed=7",)] != answers[("seed=1",)]
    record = _record(_eval(final, "eval.temperature=null", fast=False))
    assert record["k"] == 2 and record["sampling"] == {
        **sampling_settings(dataclasses.replace(run_eval, temperature=None),
                            TaskConfig(name="sort")),
        "from": f"the export's {final}/areal_like_task.yaml"}, record

    older = _moved(exports, tmp_path / "v00000005", export_yaml(TaskConfig(name="sort")))
    record = _record(_eval(older, "eval.max_examples=2", fast=False))
    assert record["policy_version"] == 5 and record["k"] == EvalConfig().k, record
    assert record["sampling"] == {**sampling_settings(EvalConfig(), TaskConfig(name="sort")),
                                  "from": f"the export's {older}/areal_like_task.yaml"}, record


def test_an_exports_task_runs_the_code_and_address_the_evaluator_names(exports, tmp_path,
                                                                        free_port):
    """A stored reward_fn/reward_url named on the command line is evaluated; own rewards freely."""
    own = "tests.learning_reward:reversed_exact"
    export = _moved(exports, tmp_path / "own", f"task: {{name: sort, reward_fn: '{own}'}}\n")
    assert _record(_eval(export, f"task.reward_fn={own}"))["task"] == "sort"

    url = f"http://127.0.0.1:{free_port()}/batch"  # nothing listens: each score says so
    export = _moved(exports, tmp_path / "remote", f"task: {{name: sort, reward_url: '{url}'}}\n")
    r = _eval(export, f"task.reward_url={url}")
    assert _record(r)["n"] == 4
    assert f"Cannot connect to host 127.0.0.1:{url.split(':')[2].split('/')[0]}" in r.stderr

    export = _moved(exports, tmp_path / "math", "task: {name: sort, reward_fn: "
                    "'areal_like.tasks.rewards.math_reward'}\n")
    assert _record(_eval(export))["task"] == "sort"


def test_a_lora_export_with_no_base_to_name_is_scored_by_its_merged_model(exports, tmp_path):
    lora = tmp_path / "lora" / "v00000003"
    shutil.copytree(exports / "moved" / "v00000003", lora / "merged")
    shutil.copy(lora / "merged" / "areal_like_task.yaml", lora)
    (lora / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": None,
                                                          "peft_type": "LORA", "r": 8}))
    record = _record(_eval(lora))
    assert record["task"] == "sort" and record["n"] == 4 and record["policy_version"] == 3


def test_a_users_model_samples_at_its_tasks_settings_and_a_merged_export_finds_its_run(
        exports, tmp_path):
    from areal_like.settings.config import load_config, to_yaml

    bare = exports / "bare" / "v00000003"
    sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 16,
                "samples_per_prompt": 0, "from": "task=sort's defaults and the command line"}
    for model in ([], ["model=local_hf"]):
        r = _eval(bare, "task=sort", *model)
        record = _record(r)
        assert record["task"] == "sort" and record["sampling"] == sampling, r.stdout
        assert "[eval] sampling at temperature 1, top_p 1, top_k -1, at most 16 new tokens, 0 " \
               "samples per prompt" in r.stderr, r.stderr

    run = tmp_path / "run"
    merged = run / "export" / "v00000003" / "merged"
    shutil.copytree(exports / "moved" / "v00000003", merged)
    (merged.parent / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (merged / "areal_like_task.yaml").write_text(
        "task: {name: sort, reward_fn: 'tests.learning_reward:reversed_exact'}\n")
    (run / "config.yaml").write_text(to_yaml(load_config(
        ["task=sort", "task.reward_fn=tests.learning_reward:reversed_exact", f"run_dir={run}"])))
    record = _record(_eval(merged))
    assert record["task"] == "sort" and record["sampling"]["from"] == f"the run's {run}/config.yaml"
    assert record["sampling"]["temperature"] == 2.0  # the run's: model=tiny's recipe
