"""The shipped environments (areal_like/tasks/envs.py): their rewards by hand, the calculator tool's
grammar, and demos that replay through the environment they were written for."""

from __future__ import annotations

import random
import sys

import pytest

from areal_like.settings.config import TaskConfig, load_config
from areal_like.tasks.environment import ChatRenderer
from areal_like.tasks.envs import GUESS_CUT_CREDIT, GUESS_TURN_COST, Calculator, GuessNumber, calc
from areal_like.tasks.task import Example, make_task
from areal_like.tasks.tokenizer import char_tokenizer
from areal_like.tasks.tools import ToolRegistry, parse_tool_calls
from launch.preflight import check_env
from trainer.sft import demo_pairs


def test_calc_evaluates_integer_arithmetic_only():
    assert calc("347*29") == "10063" and calc(" 7 - 10 // 3 ") == "4" and calc("-2*3") == "-6"
    for bad in ("__import__('os')", "2**100", "1.5*2", "x+1", "1" * 65):
        with pytest.raises(ValueError):
            calc(bad)


def test_calculator_rewards_the_right_product_once():
    env = Calculator()
    assert env.reset(Example("347*29", "10063")) == [{"role": "user", "content": "347*29"}]
    assert env.step(" 10063 ") == ([], 1.0, True, {"correct": True})
    assert env.step("10064") == ([], 0.0, True, {"correct": False})


def test_guessing_scores_fewer_turns_higher():
    env = GuessNumber()
    env.reset(Example("guess1-32", "20"))
    # a wrong guess earns GUESS_CUT_CREDIT x the share of 1..32 it rules out:
    # 1-16, then 24-32, then nothing
    assert env.step("16") == ([{"role": "user", "content": "higher:17-32"}],
                              GUESS_CUT_CREDIT * 16 / 32, False, {})
    assert env.step("24") == ([{"role": "user", "content": "lower:17-23"}],
                              GUESS_CUT_CREDIT * 9 / 32, False, {})
    # ruled out already
    assert env.step("3") == ([{"role": "user", "content": "higher:17-23"}], 0.0, False, {})
    assert env.step("20") == ([], 1.0 - 3 * GUESS_TURN_COST, True, {"found": True, "guesses": 4})
    env.reset(Example("guess1-32", "20"))
    assert env.step("twenty") == ([], 0.0, True, {"found": False, "guesses": 1})


@pytest.mark.parametrize("env_cls,task", [(Calculator, "calc"), (GuessNumber, "guess")])
def test_demos_replay_through_their_environment(env_cls, task):
    examples = make_task(TaskConfig(name=task))
    rng = random.Random(0)
    registry = ToolRegistry(getattr(env_cls, "tools", None))
    rewards = []
    for i in range(40):
        ex = examples.example(i)
        demo, env = env_cls.demo(ex, rng), env_cls()
        assert env.reset(ex) == demo[:1]
        k, reward, done = 1, 0.0, False
        while k < len(demo):
            text = demo[k]["content"]
            calls = parse_tool_calls(text)
            if calls:  # the demo's tool message is what the tool answers
                assert registry.check(calls[0]) == ""
                assert demo[k + 1]["content"] == calc(**calls[0].arguments)
                k += 2
                continue
            new, r, done, _ = env.step(text)
            reward += r
            assert demo[k + 1:k + 1 + len(new)] == new
            k += 1 + len(new)
        assert done
        rewards.append(reward)
    # some demos are imperfect: RL has something to improve
    assert 0 < sum(rewards) / len(rewards) < 1


def test_the_warm_start_sees_a_demo_laid_out_as_the_episode_would_be():
    cfg = load_config(["experiment=calc_env"])
    tok, task = char_tokenizer(), make_task(cfg.task)
    index = next(i for i in range(50)
                 if len(Calculator.demo(task.example(i), random.Random(i))) == 4)
    demo = Calculator.demo(task.example(index), random.Random(index))
    pairs = demo_pairs(cfg, task, tok)(index, random.Random(index))
    assert len(pairs) == 2  # one per assistant turn
    # the episode: prompt, the generated call + EOS, the template's continuation,
    # the generated answer + EOS
    r = ChatRenderer(tok, cfg.task.chat_template,
                     [{"type": "function", "function": Calculator.tools[0]}])
    call = r.encode(demo[1]["content"]) + [tok.eos_token_id]
    episode = (r.prompt_ids(demo[:1]) + call
               + r.continuation_ids(demo[:1], demo[1]["content"], call, demo[2:3]))
    assert pairs[0] == (r.prompt_ids(demo[:1]), call)
    assert pairs[1] == (episode, r.encode(demo[3]["content"]) + [tok.eos_token_id])


def test_the_preflight_names_an_environment_that_cannot_load():
    assert check_env(load_config(["experiment=calc_env"])) == []
    nope = "task.env=areal_like.tasks.envs:Nope"
    assert check_env(load_config(["experiment=calc_env", nope])) == [
        "task.env='areal_like.tasks.envs:Nope' cannot be loaded: AttributeError: module "
        "'areal_like.tasks.envs' has no attribute 'Nope'"]
    # a function, not a class
    bad = check_env(load_config(["experiment=calc_env", "task.env=areal_like.tasks.envs:calc"]))
    assert bad == ["task.env='areal_like.tasks.envs:calc' cannot be loaded: TypeError: calc() "
                   "missing 1 required positional argument: 'e'"]


@pytest.fixture
def launcher_cwd(tmp_path, monkeypatch):
    """tmp_path is the working directory, and not on sys.path: ``areal-like`` (a console script)
    has no working directory there, the rollout servers (``python -m rollout_server``) have it
    first."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])


def test_the_preflight_imports_an_environment_from_the_working_directory(
        tmp_path, launcher_cwd, monkeypatch):
    monkeypatch.delitem(sys.modules, "my_cwd_env", raising=False)
    (tmp_path / "my_cwd_env.py").write_text(
        "class Env:\n    def reset(self, example):\n        return []\n"
        "    def step(self, text):\n        return [], 0.0, True, {}\n")
    try:
        assert check_env(load_config(["experiment=calc_env", "task.env=my_cwd_env:Env"])) == []
        assert str(tmp_path) not in sys.path  # the launcher's own imports are left as they were
    finally:
        sys.modules.pop("my_cwd_env", None)


def test_the_preflight_imports_each_tool_of_an_environment_and_names_the_bad_ones(
        tmp_path, launcher_cwd):
    """A tool's typo'd function path, or an ``async def`` tool, surfaced only when the model called
    it (an error each call, at run time); a tool in OpenAI's shape read ``KeyError: 'name'`` and a
    bad schema its whole meta-schema walk. The preflight imports each tool's function from the
    working directory, as the tool workers will, and names the key, the tool and the path."""
    (tmp_path / "my_cwd_tool_fns.py").write_text("def calc(e):\n    return e\n\n"
                                                 "async def acalc(e):\n    return e\n")
    (tmp_path / "my_cwd_tools.py").write_text(
        "from areal_like.tasks.envs import CALC_TOOL, Calculator\n\n"
        "class Env(Calculator):\n"
        "    tools = [{**CALC_TOOL, 'function': 'my_cwd_tool_fns:calc'}]\n\n"
        "class Typo(Calculator):\n"
        "    tools = [{**CALC_TOOL, 'function': 'my_cwd_tool_fns:calx'}]\n\n"
        "class Async(Calculator):\n"
        "    tools = [{**CALC_TOOL, 'function': 'my_cwd_tool_fns:acalc'}]\n\n"
        "class OpenAI(Calculator):\n"
        "    tools = [{'type': 'function', 'function': {'name': 'calc'}}]\n\n"
        "class Schema(Calculator):\n"
        "    tools = [{**CALC_TOOL, 'parameters': {'type': 'objekt'}}]\n")
    try:
        problems = {env: check_env(load_config(["experiment=calc_env",
                                                f"task.env=my_cwd_tools:{env}"]))
                    for env in ("Env", "Typo", "Async", "OpenAI", "Schema")}
        # imported in a child Python, as a tool worker imports it: not in the launcher
        assert "my_cwd_tool_fns" not in sys.modules
    finally:
        sys.modules.pop("my_cwd_tools", None)
    assert problems["Env"] == []
    assert problems["Typo"] == [
        "task.env='my_cwd_tools:Typo': tool 'calc' (function 'my_cwd_tool_fns:calx') cannot "
        "be loaded: AttributeError: module 'my_cwd_tool_fns' has no attribute 'calx'"]
    assert problems["Async"] == [
        "task.env='my_cwd_tools:Async': tool 'calc' (function 'my_cwd_tool_fns:acalc') "
        "cannot be loaded: TypeError: it is an async def: a tool is a plain def"]
    [openai] = problems["OpenAI"]
    assert openai.startswith(
        "task.env='my_cwd_tools:OpenAI' cannot be loaded: ValueError: a tool is "
        '{"name": str, "function": "pkg.module:fn", "description": str, "parameters": JSON '
        "schema}, not {'type': 'function'")
    assert problems["Schema"] == [
        "task.env='my_cwd_tools:Schema' cannot be loaded: ValueError: tool 'calc': "
        "parameters is not a JSON schema: 'objekt' is not valid under any of the given schemas"]
