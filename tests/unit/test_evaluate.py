"""Evaluation (rollout_server/evaluate.py): schedule, figures, roster rule, final catch-up, CLI."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from service_harness import start, step  # the buffer service with fake sockets
from test_weight_members import ScriptedBuffer

from areal_like.engines.client import EngineError, GenerateOutput
from areal_like.engines.sglang import SGLangClient
from areal_like.net.metrics import Metrics
from areal_like.settings.config import (
    EXPORT_TASK_FILE,
    BufferConfig,
    EngineConfig,
    EvalConfig,
    ModelConfig,
    TaskConfig,
    WeightSyncConfig,
    export_yaml,
    load_config,
    load_daemon_config,
    to_yaml,
)
from areal_like.tasks.task import Example
from areal_like.wire import protocol as P
from launch.job import plan_job
from rollout_server.engine import EmbeddedEngine
from rollout_server.evaluate import (
    EvalSchedule,
    evaluate,
    main,
    read_done_versions,
    record_eval_metrics,
    summarize,
)
from rollout_server.reward_pool import RewardPoolError
from trainer.weight_sync import WeightBroadcaster


@pytest.mark.parametrize("every,at_start,at_end,done,due,words", [
    # every=5, 20 steps: 0 (baseline), 5, 10, 15, 20 (final)
    (5, True, True, set(), [0, 5, 10, 15, 20], "at the start, every 5 versions and at version 20"),
    (5, False, True, set(), [5, 10, 15, 20], "every 5 versions and at version 20"),
    (5, True, False, set(), [0, 5, 10, 15], "at the start and every 5 versions"),
    # every=0: only the final one (no baseline without every)
    (0, True, True, set(), [20], "at version 20"),
    (0, True, False, set(), [], "never"),
    # a restarted server does not repeat what eval.jsonl holds
    (5, True, True, {0, 5}, [10, 15, 20], "at the start, every 5 versions and at version 20"),
])
def test_schedule_versions_when_every_version_is_seen(every, at_start, at_end, done, due, words):
    s = EvalSchedule(EvalConfig(every=every, at_start=at_start, at_end=at_end), steps=20, done=done)
    assert s.describe() == words
    seen = []
    for v in range(0, 21):
        if s.due(v):
            seen.append(v)
            s.done.add(v)
    assert seen == due


def test_schedule_catches_up_when_the_engine_skips_versions():
    """A jump 9 -> 11 crossed 10: 11 is evaluated, labelled 11, once."""
    s = EvalSchedule(EvalConfig(every=5, at_start=False), steps=20, done={5})
    assert not s.due(9)
    assert s.due(11)
    s.done.add(11)
    assert not s.due(12) and not s.due(14) and s.due(15)
    assert not s.due(25)  # past trainer.steps (a resumed run with fewer steps): never


def test_summarize_hand_computed():
    # 3 prompts; greedy rewards 1, 0, 0.5 -> accuracy 1/3 (0.5 is not full credit), mean reward 0.5
    # k=2 samples: [1, 0] [0, 0] [1, 1] -> mean@2 = (0.5 + 0 + 1) / 3 = 0.5, pass@2 = 2/3
    out = summarize([1.0, 0.0, 0.5], [[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]], k=2)
    assert out["n"] == 3 and out["k"] == 2
    assert out["greedy_accuracy"] == pytest.approx(1 / 3)
    assert out["greedy_reward"] == pytest.approx(0.5)
    assert out["mean@2"] == pytest.approx(0.5)
    assert out["pass@2"] == pytest.approx(2 / 3)
    assert "mean@0" not in summarize([1.0], [[]], k=0)


class _TrackedEngine:
    """/generate as pick(ids, params) says: hang, refuse (400) or answer (its ids or [1])."""

    def __init__(self, pick):
        self.pick, self.running = pick, set()

    async def generate(self, input_ids, params):
        self.running.add(id(asyncio.current_task()))
        try:
            how = self.pick(input_ids, params)
            if how == "refuse":
                raise EngineError("/generate", 400, "prompt too long")
            if how == "hang":
                await asyncio.Event().wait()
            out = how or [1]
            return GenerateOutput(rid="r", output_ids=out, logprobs=[-0.1] * len(out),
                                  finish_reason="stop", finish_message="", abort_status=None,
                                  weight_version="5")
        finally:
            self.running.discard(id(asyncio.current_task()))


def _evaluate_tracked(engine, rewards, n, ev):
    """(evaluate's result or error, the engine calls still running when it returned)."""
    async def run():
        try:
            out = await asyncio.wait_for(evaluate(
                engine, [SimpleNamespace(prompt=str(i), index=i, answer="") for i in range(n)],
                lambda ex: [ex.index], str, rewards, ev, TaskConfig(), [], lambda: 0), 10)
        except Exception as e:  # noqa: BLE001 - the caller asserts which
            out = e
        return out, set(engine.running)

    return asyncio.run(run())


def test_a_reward_that_cannot_load_or_a_refused_request_stops_requests_before_evaluate_returns():
    class Rewards:
        async def score_group(self, prompt, responses, example):
            raise RewardPoolError("task.reward_fn='m:f' cannot be loaded in a reward worker")

    # every prompt but the first is still generating
    engine = _TrackedEngine(lambda ids, params: "hang" if ids[0] > 0 else None)
    out, left = _evaluate_tracked(engine, Rewards(), 4, EvalConfig(k=1))
    assert isinstance(out, RewardPoolError) and left == set()

    def pick(ids, params):  # prompt 0: its greedy request refused, its samples still generating
        return None if ids[0] else "refuse" if params["temperature"] == 0.0 else "hang"

    out, left = _evaluate_tracked(_TrackedEngine(pick), _Rewards(), 2,
                                  EvalConfig(k=2, temperature=1.0))
    assert out["errors"] == 1 and out["n"] == 1 and left == set()


def test_done_versions_survive_a_torn_line(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"policy_version": 0}) + "\n" + json.dumps({"policy_version": 5})
                    + "\n{\"policy_ver")
    assert read_done_versions(path) == {0, 5}
    assert read_done_versions(tmp_path / "missing.jsonl") == set()


def test_eval_of_a_run_directory_or_a_checkpoint_it_cannot_export_is_one_error_line(tmp_path,
                                                                                   capfd):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("run_dir: run\n")
    for path in (run_dir, run_dir / "checkpoints"):
        assert main([str(path)]) == 2
        err = capfd.readouterr().err
        assert err.count("error:") == 1 and "neither a Hugging Face model directory" in err, err
        assert "<run_dir>/export/v<version>" in err, err
    assert main([str(tmp_path / "missing")]) == 2
    assert capfd.readouterr().err == f"error: {tmp_path / 'missing'} does not exist\n"
    checkpoints = run_dir / "checkpoints"  # one its run pruned
    for version in (8, 10):
        (checkpoints / f"v{version:08d}").mkdir(parents=True)
    assert main([str(checkpoints / "v00000004")]) == 2
    err = capfd.readouterr().err
    assert err.startswith(f"error: {checkpoints / 'v00000004'} was deleted by its run"), err
    assert "trainer.keep_checkpoints" in err and "holds v00000008, v00000010" in err, err
    lone = tmp_path / "lone" / "checkpoints" / "v00000003"  # no run config beside it
    lone.mkdir(parents=True)
    for name in (".metadata", "meta.pt"):  # never read: export refuses first
        (lone / name).write_bytes(b"")
    assert main([str(lone), "task=reverse"]) == 2
    out, err = capfd.readouterr()
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert out == "" and errors == [f"error: no run config at {tmp_path / 'lone' / 'config.yaml'}: "
                                    "pass --config-file <run_dir>/config.yaml"], err


def _export_with_task(tmp_path, name="sort", **task) -> Path:
    """An export (its config.json never read) whose task file stores ``task``."""
    export = tmp_path / "v00000004"
    export.mkdir()
    (export / "config.json").write_text("{}")
    (export / EXPORT_TASK_FILE).write_text(yaml.safe_dump({"task": {"name": name, **task}}))
    return export


def test_an_evaluating_server_is_out_of_the_roster_until_it_says_it_is_done(tmp_path):
    svc = start(tmp_path, BufferConfig())
    try:
        for sid in ("a", "b"):
            step(svc, P.Register(server_id=sid, engine_url=f"http://{sid}", policy_version=0))
        assert [m.server_id for m in step(svc, P.RosterRequest()).members] == ["a", "b"]
        step(svc, P.Heartbeat(server_id="a", policy_version=3, evaluating=True))
        roster = step(svc, P.RosterRequest())
        assert [m.server_id for m in roster.members] == ["b"] and roster.evaluating == ["a"]
        step(svc, P.Heartbeat(server_id="a", policy_version=3))  # done: back in the next sync
        roster = step(svc, P.RosterRequest())
        assert [m.server_id for m in roster.members] == ["a", "b"] and roster.evaluating == []
    finally:
        svc.stop()


def _roster(versions: dict[str, int], evaluating=(), evaluates=()) -> P.Roster:
    return P.Roster(members=[P.RosterEntry(server_id=s, engine_url="",
                                           engine_ranks=1, policy_version=v,
                                           evaluates=s in evaluates) for s, v in versions.items()],
                    policy_version=10, evaluating=list(evaluating))


@pytest.fixture
def rank0():
    """Trainer rank 0's broadcaster (``WeightBroadcaster``); its buffer is set by each test."""
    broadcaster = WeightBroadcaster(WeightSyncConfig(), buffer_address="tcp://127.0.0.1:1",
                                    rank=0, device=torch.device("cpu"))
    broadcaster.client.close()
    yield broadcaster
    broadcaster.close()


@pytest.mark.parametrize("rosters, final_eval, decisions", [
    # an evaluating server is waited for, then pushed the final version once
    ([_roster({"b": 10}, evaluating=["a"]), _roster({"a": 7, "b": 10}),
      _roster({"a": 10, "b": 10})], False, ["wait", "push", "done"]),
    # with a final eval scheduled: the evaluator is waited for until it registers (at version 0)
    ([_roster({"b": 10}), _roster({"a": 0, "b": 10}, evaluates=["a"]),
      _roster({"a": 10, "b": 10}, evaluates=["a"])], True, ["wait", "push", "done"]),
    # a member at the final label that another trainer (not this one's pushes) gave it
    ([_roster({"a": 10, "b": 10})] * 2, False, ["push", "done"]),
])
def test_final_catch_up_pushes_the_final_version_once_to_each_member(
        rank0, rosters, final_eval, decisions):
    rank0.client, rank0.loaded = ScriptedBuffer(*rosters), {"b": 10}  # what this trainer pushed
    deadline, pushes = time.monotonic() + 60, 0
    for want in decisions:
        assert rank0.catch_up_decision(10, deadline, pushes, final_eval=final_eval) == want
        if want == "push":
            rank0.loaded["a"], pushes = 10, pushes + 1


@pytest.mark.parametrize("versions, past, pushes, final_eval", [
    ({"a": 7}, True, 0, False), ({"a": 7}, False, 3, False),  # the deadline, or CATCH_UP_PUSHES
    ({"b": 10}, False, 0, False),  # no final evaluation: no wait for an evaluator
    ({"b": 10}, True, 0, True),  # a late evaluator: waited for until the deadline
])
def test_final_catch_up_gives_up_when_bounded(rank0, versions, past, pushes, final_eval):
    rank0.client, rank0.loaded = ScriptedBuffer(_roster(versions)), {"a": 10, "b": 10}
    deadline = time.monotonic() + (-1 if past else 60)
    assert rank0.catch_up_decision(10, deadline, pushes, final_eval=final_eval) == "done"


def _scripted_engine() -> _TrackedEngine:
    """Greedy answers 1; samples alternate right/wrong; prompt 9 is refused (400)."""
    sampled: dict[int, int] = {}

    def pick(ids, params):
        if ids[0] == 9 or params["temperature"] == 0.0:
            return "refuse" if ids[0] == 9 else [1]
        sampled[ids[0]] = sampled.get(ids[0], 0) + 1
        return [ids[0] + 1] if sampled[ids[0]] % 2 else [7]
    return _TrackedEngine(pick)


class _Rewards:
    async def score_group(self, prompt, responses, example):
        return [(1.0 if r == str(example.answer) else 0.0, None) for r in responses]


def _eval(examples, k=2):
    ev, task = EvalConfig(k=k, temperature=1.0, max_new_tokens=4), TaskConfig(top_p=1.0, top_k=-1)
    exs = [Example(prompt=str(p), answer=str(p + 1)) for p in examples]
    return asyncio.run(evaluate(_scripted_engine(), exs,
                                lambda ex: [int(ex.prompt)], lambda ids: str(ids[0]),
                                _Rewards(), ev, task, [2], lambda: 5))


def test_evaluate_greedy_and_sampled_figures_with_a_refused_prompt_counted():
    out = _eval([0, 3, 9])
    # prompt 0: greedy "1" is right; 3: greedy "1" is wrong; 9 refused (counted, left out)
    assert out["n"] == 2 and out["errors"] == 1 and "prompt too long" in out["first_error"]
    assert out["greedy_accuracy"] == 0.5
    # each prompt's 2 samples: one right, one wrong
    assert out["mean@2"] == 0.5 and out["pass@2"] == 1.0
    assert out["token_versions"] == [5, 5]
    with pytest.raises(EngineError, match="every eval prompt failed") as e:
        _eval([9, 9])
    # the refusal's own status (before: None, which reads "unreachable": the engine answered)
    assert e.value.status == 400 and "unreachable" not in str(e.value), e.value


def test_eval_with_a_batched_reward_that_cannot_take_the_columns_is_one_error_line(
        tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the workers import from here
    export = _export_with_task(tmp_path)
    spec = "tests.unit.trl_reward_fns:needs_solution"
    assert main([str(export), "task=reverse", f"task.reward_fn={spec}"]) == 2
    out, err = capfd.readouterr()
    note, error = err.splitlines()
    assert out == "" and note == (f"note: scoring on the task given (task=...), not the one "
                                  f"{export} stores in {EXPORT_TASK_FILE}")
    assert error.startswith(f"error: task.reward_fn='{spec}' cannot be loaded in a reward worker: "
                            "it is a batched reward"), err
    assert "missing a required argument: 'solution'" in error, err


def test_eval_metrics_name_the_sample_count_in_a_label_not_in_the_name():
    m = Metrics()
    record_eval_metrics(m, {"greedy_accuracy": 0.5, "greedy_reward": 0.6, "mean@4": 0.25,
                            "pass@4": 0.75}, 4)
    value = m.registry.get_sample_value
    assert (value("areal_rollout_eval_mean", {"k": "4"}) == 0.25
            and value("areal_rollout_eval_pass", {"k": "4"}) == 0.75)
    assert value("areal_rollout_eval_greedy_accuracy") == 0.5
    assert b"_at_4" not in m.render()
    for total in (0, 2, 2, 5):  # a running count is a counter brought up to its total
        m.count_to("trainer/groups_dropped_bad_data", "dropped", total)
    assert m.registry.get_sample_value("areal_trainer_groups_dropped_bad_data_total") == 5


def test_the_run_config_names_its_data_files_absolute_so_eval_reads_them_from_anywhere(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, _ = plan_job(load_config(["task=dataset", "task.dataset_path=data/train.jsonl",
                                   "task.eval_path=data/test.jsonl", "run_dir=run"]), cpus=[0, 1])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    task = load_daemon_config(["--config-file", str(tmp_path / "config.yaml")]).task
    data = tmp_path / "data"
    assert (task.dataset_path, task.eval_path) == (str(data / "train.jsonl"),
                                                   str(data / "test.jsonl"))
    assert plan_job(cfg, cpus=[0, 1])[0].task == cfg.task  # a laid-out config stays as it is


def test_an_evaluation_samples_the_same_responses_again_from_the_configs_seed():
    """Per-sample seeds: the same responses at any concurrency; another seed changes them."""
    class Kept:  # keeps every response, scores none
        async def score_group(self, prompt, responses, example):
            seen.append(tuple(responses))
            return [(0.0, None)] * len(responses)

    ev, task = EvalConfig(k=3, temperature=1.5, max_new_tokens=6), TaskConfig(top_p=1.0, top_k=-1)
    examples = [Example(prompt=str(p), answer="") for p in range(8)]

    async def responses(engine, seed: int, concurrency: int) -> list[tuple]:
        seen.clear()
        client = SGLangClient(engine.url)
        try:
            await evaluate(client, examples, lambda ex: [3 + int(ex.prompt)], str, Kept(), ev,
                           task, [], lambda: 0, concurrency=concurrency, seed=seed)
        finally:
            await client.close()
        return sorted(seen)

    seen: list[tuple] = []
    engine = EmbeddedEngine(ModelConfig(max_position_embeddings=128),
                            EngineConfig(max_running_requests=8)).start()
    try:
        first = asyncio.run(responses(engine, seed=0, concurrency=64))
        assert asyncio.run(responses(engine, seed=0, concurrency=3)) == first
        assert asyncio.run(responses(engine, seed=1, concurrency=64)) != first
    finally:
        engine.stop()


@pytest.mark.parametrize("task, args, starts, says", [
    # on a synthetic task's export the refusal names task.eval_path, the key given
    ({"name": "reverse"}, ["task.eval_path={tmp}/mine.jsonl"], "error: task.eval_path=",
     "add task=dataset"),
    # the task file is data: ${oc.env:...} is refused by name, never resolved
    ({"reward_url": "http://evil.invalid/${oc.env:EVAL_TEST_SECRET}"}, [],
     "error: task.reward_url: ", "is an interpolation"),
    ("policy_version: ${oc.env:EVAL_TEST_SECRET}\n", [], "error: ", "policy_version: "),
    # no code or address the evaluator did not name: a reward_fn outside the project's, a reward_url
    ({"reward_fn": "shutil:rmtree"}, [], "error: task.reward_fn='shutil:rmtree' in ",
     "is not one of"),
    ({"reward_url": "http://scores.example/batch"}, [],
     "error: task.reward_url='http://scores.example/batch' in ", ""),
    # the reward named, but not importable: before the model loads (its config.json is "{}")
    ({"reward_fn": "my_mod.rewards:score"}, ["task.reward_fn=my_mod.rewards:score"],
     "error: task.reward_fn='my_mod.rewards:score' cannot be loaded in a reward worker: "
     "ModuleNotFoundError: No module named 'my_mod' (imported from the working directory, {tmp}, "
     "then PYTHONPATH)", ""),
])
def test_an_exports_stored_task_is_refused_in_one_line_naming_its_key(
        tmp_path, monkeypatch, capfd, task, args, starts, says):
    monkeypatch.setenv("EVAL_TEST_SECRET", "hunter2")
    monkeypatch.chdir(tmp_path)
    export = _export_with_task(tmp_path, **(task if isinstance(task, dict) else {}))
    if isinstance(task, str):
        (export / EXPORT_TASK_FILE).write_text(task)
    assert main([str(export), *(a.format(tmp=tmp_path) for a in args)]) == 2
    out, err = capfd.readouterr()
    assert out == "" and err.startswith(starts.format(tmp=tmp_path)), err
    assert says in err and err.count("\n") == 1, err
    assert "hunter2" not in err and ("oc.env" not in str(task) or "is an interpolation" in err)


def test_eval_started_inside_an_export_imports_nothing_shipped_in_it(tmp_path, monkeypatch,
                                                                      capsys):
    """Eval's children never import a package planted in the export (cwd on sys.path)."""
    export = _export_with_task(tmp_path, reward_fn="areal_like.tasks.rewards:math_reward")
    marker = tmp_path / "imported"
    (export / "rollout_server").mkdir()
    (export / "rollout_server" / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(export)
    try:
        rc = main([str(export), "eval.max_examples=1", "eval.k=0"])
    finally:  # whatever eval did next, the planted module must not have run
        assert not marker.exists(), "a module shipped in the export was imported"
    assert rc == 2
    assert "run `areal-like eval` from outside" in capsys.readouterr().err


def test_a_run_config_an_export_names_is_read_only_when_it_is_the_users_own(tmp_path, capsys):
    """A run config others may write (or outside a 0700 run dir) is not the user's own."""
    config = tmp_path / "run" / "config.yaml"
    config.parent.mkdir()
    config.write_text("task:\n  name: reverse\n")
    export = tmp_path / "mine"
    export.mkdir()
    (export / "config.json").write_text("{}")
    (export / EXPORT_TASK_FILE).write_text(export_yaml(
        TaskConfig(name="reverse", reward_fn="my_rewards:score"), run_config=config))
    # then a file only its owner may write, in a folder that is not a run directory (a
    # download's folders are 0755; a run directory is 0700): not the user's configuration either
    for config_mode, folder_mode in ((0o666, 0o700), (0o644, 0o755)):
        os.chmod(config, config_mode)
        os.chmod(config.parent, folder_mode)
        assert main([str(export)]) == 2
        err = capsys.readouterr().err
        assert "task.reward_fn='my_rewards:score' in" in err and "is not one of" in err, err
