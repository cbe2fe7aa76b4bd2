"""Environments written with the verifiers library (``task=verifiers``,
areal_like/tasks/verifiers_env.py). The episode test's engine is test_agent_endpoint's
``Scripted``, so the model calls the tool; everything else is real: verifiers' Env, its
interception server, its chat loop, its MCP tool server process, the endpoint and the pool."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from areal_like.settings.config import TaskConfig
from areal_like.tasks import verifiers_env
from areal_like.tasks.environment import ChatRenderer
from areal_like.tasks.task import make_task
from areal_like.tasks.tokenizer import EOS_ID, char_tokenizer
from areal_like.wire.protocol import Credit
from rollout_server.agent_endpoint import AgentEndpoint
from rollout_server.agent_episode import AgentRunner, agent_pool
from rollout_server.episode import EpisodeContext
from tests.conftest import child_env, run_cli
from tests.integration.test_agent_endpoint import Scripted

REPO = Path(__file__).resolve().parents[2]
VF = yaml.safe_load((REPO / "configs/task/verifiers.yaml").read_text())
CALC = yaml.safe_load((REPO / "configs/experiment/vf_calc.yaml").read_text())["task"]
TOK = char_tokenizer()
CALL = '<tool_call>{"name":"mul","arguments":{"a":%s,"b":%s}}</tool_call>'


def ids(text: str) -> list[int]:
    return [int(t) for t in TOK(text, add_special_tokens=False)["input_ids"]]


def calc_cfg(**over) -> TaskConfig:
    fields = dict(name="verifiers", env="areal_like.tasks.vf_calc", env_args={"num_tasks": 4},
                  agent=VF["agent"], chat_template=CALC["chat_template"], max_new_tokens=96,
                  max_turns=4, max_episode_tokens=320, group_size=2, agent_workers=2,
                  episode_timeout_s=60.0)
    return TaskConfig(**{**fields, **over})


class ByTurn(Scripted):
    """The tool call on an episode's first turn, the answer once the tool's result is in its
    context: whatever order the group's episodes call in."""

    def __init__(self, call: str, answer: str, result: str):
        super().__init__([])
        self.call, self.answer, self.result = call, answer, result

    async def generate(self, input_ids, params):
        self.replies = [self.answer if self.result in TOK.decode(input_ids) else self.call]
        return await super().generate(input_ids, params)


def test_a_tool_episode_is_verifiers_own_and_its_trajectory_is_what_the_endpoint_served():
    from areal_like.tasks.vf_calc import call_text

    cfg = calc_cfg()
    example = make_task(cfg).example(0)
    a, b = example.prompt.split("*")
    demo = next(d for seed in range(20)
                if len(d := verifiers_env.demo(example, random.Random(seed))) == 4)
    assert demo[1]["content"] == call_text(int(a), int(b))  # the demo calls the tool as ...
    engine = ByTurn(CALL % (a, b), example.answer, f"tool:{int(a) * int(b)}|")  # ... this does
    renderer = ChatRenderer(TOK, cfg.chat_template)
    pool = agent_pool(cfg)

    async def scenario():
        ctx = EpisodeContext(client=engine, task=make_task(cfg), tokenizer=TOK, rewards=None,
                             task_cfg=cfg, server_id="s", current_version_fn=lambda: 3)
        ep = await AgentEndpoint(ctx).start()
        try:
            credit = Credit(lease_id="l1", prompt_index=0, epoch=0, deadline_s=60.0)
            return (await AgentRunner(ctx, ep, pool).run_group(credit)).trajectories
        finally:
            await ep.close()

    try:
        pool.wait_ready(120)
        trajectories = asyncio.run(scenario())
    finally:
        pool.close()
    assert len(trajectories) == cfg.group_size and len(engine.calls) == 2 * cfg.group_size
    served = ids(CALL % (a, b)) + [EOS_ID], ids(example.answer) + [EOS_ID]
    for traj in trajectories:
        # the score is the task's @vf.reward: the answer after the tool's result
        assert traj.reward == 1.0 and traj.finish_reason == "stop", traj.metadata
        seq = list(traj.prompt_ids) + list(traj.output_ids)
        mask = [0] * len(traj.prompt_ids) + list(traj.loss_mask)
        # the engine was asked for exactly the trajectory's prefixes, and what it answered is
        # exactly what is trained on, token for token
        first, second = sorted({tuple(c[0]) for c in engine.calls if c[0] == seq[:len(c[0])]},
                               key=len)
        assert seq[len(first):len(first) + len(served[0])] == served[0]
        assert seq[len(second):] == served[1]
        assert [t for t, m in zip(seq, mask) if m] == served[0] + served[1]
        context = TOK.decode(seq[len(first) + len(served[0]):len(second)])
        assert f"tool:{int(a) * int(b)}|" in context  # the MCP tool's result, in the context
        # the warm start's demo of this task (trainer/sft.py: each assistant turn's prompt is the
        # rendered conversation before it) is this very sequence, token for token
        assert renderer.prompt_ids(demo[:3]) + served[1] == seq
        assert renderer.prompt_ids(demo[:1]) + served[0] == seq[:len(first) + len(served[0])]


def summary_of(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def rewards_of(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics/trainer.jsonl").read_text().splitlines()
    return [json.loads(line)["reward_mean"] for line in lines if "reward_mean" in line]


@pytest.mark.timeout(900)
def test_the_multi_turn_tool_example_runs_a_job_end_to_end(tmp_path):
    """experiment=vf_calc, shortened: a few warm-start steps on the taskset's demo conversations,
    then two RL steps."""
    run_dir = tmp_path / "run"
    proc = run_cli("run", "-q", "experiment=vf_calc", "warm_start.steps=4", "trainer.steps=2",
                   "task.group_size=2", "buffer.groups_per_step=1", "buffer.max_staleness=1",
                   "task.max_turns=2", "task.env_args={num_tasks: 64}", f"run_dir={run_dir}",
                   timeout=840)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = summary_of(proc.stdout)
    assert summary["end"] == "completed" and summary["steps_trained"] == 2, summary
    assert len(rewards_of(run_dir)) == 2
    # verifiers' episodes ran: no group of them failed (the rollout server logs such a group;
    # the episodes are too quick now for the job's 10 s metrics scrapes to count them)
    log = (run_dir / "logs/rollout-0.log").read_text()
    assert "agent raised" not in log and " failed (" not in log, log[-3000:]


def test_without_the_extra_task_verifiers_is_refused_before_anything_starts(tmp_path):
    run_dir = tmp_path / "run"
    code = ("import sys; sys.modules['verifiers'] = None; from launch.cli import main; "
            f"sys.exit(main(['run', 'experiment=vf_reverse', 'run_dir={run_dir}']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, env=child_env(), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "task.name=verifiers needs the verifiers package: pip install 'areal-like[verifiers]'" \
        in proc.stderr, proc.stderr
    assert not run_dir.exists()  # no daemon, no warm start, nothing written


@pytest.mark.timeout(1500)
def test_the_single_turn_example_learns(tmp_path):
    """experiment=vf_reverse as shipped. A step's mean is over 32 episodes, so the rise is judged on
    the first and last 10 of its 80 steps (320 episodes each; std of the difference ~0.04)."""
    run_dir = tmp_path / "run"
    proc = run_cli("run", "-q", "experiment=vf_reverse", f"run_dir={run_dir}", timeout=1440)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary_of(proc.stdout)["steps_trained"] == 80
    rewards = rewards_of(run_dir)
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last >= first + 0.15, rewards


ENDLESS = """
import itertools
import verifiers.v1 as vf

class Data(vf.TaskData):
    answer: str

class Endless(vf.Taskset[vf.Task[Data, vf.State, vf.TaskConfig], vf.TasksetConfig]):
    def load(self):  # never ends, and the class does not say INFINITE = True
        for i in itertools.count():
            yield vf.Task(Data(prompt=str(i), answer=str(i + 1)), self.config.task)

__all__ = ["Endless"]
"""


def test_an_eval_split_is_refused_with_a_taskset_naming_the_key():
    """A taskset has no eval split here: evaluations would score its training tasks as single
    answers."""
    from areal_like.settings.config import ConfigError, load_config
    from launch.preflight import PreflightError, checked

    with pytest.raises(ConfigError, match="task.eval_fraction=0.1 is invalid"):
        load_config(["experiment=vf_reverse", "task.eval_fraction=0.1"])
    with pytest.raises(PreflightError, match="a verifiers taskset has no eval split here: set "
                       "eval.every=0"):
        checked(load_config(["experiment=vf_reverse", "eval.every=5"]))


def test_a_taskset_gives_its_first_num_prompts_tasks_or_is_named_if_it_cannot_load(
        tmp_path, monkeypatch):
    """Even an endless one; a bad config field by its task.env_args key, a module's own error with
    the line that raised."""
    from areal_like.settings.config import ConfigError

    (tmp_path / "endless_env.py").write_text(ENDLESS)
    (tmp_path / "broken_env.py").write_text("x = 1\nraise RuntimeError('my env is broken')\n")
    monkeypatch.syspath_prepend(tmp_path)
    got = verifiers_env.examples(TaskConfig(name="verifiers", env="endless_env", agent=VF["agent"],
                                            num_prompts=3))
    assert [(e.prompt, e.answer) for e in got] == [("0", "1"), ("1", "2"), ("2", "3")]
    with pytest.raises(ConfigError, match=r"cannot be loaded: task.env_args.bogus: Extra inputs"):
        verifiers_env.examples(calc_cfg(env_args={"bogus": 1}))
    with pytest.raises(ConfigError, match=r"RuntimeError: my env is broken \(.*broken_env.py:2\)"):
        verifiers_env.examples(calc_cfg(env="broken_env"))
