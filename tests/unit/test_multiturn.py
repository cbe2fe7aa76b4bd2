"""Multi-turn episodes (rollout_server/multiturn.py) against a scripted /generate stand-in."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import numpy as np
import pytest

from areal_like.engines.client import GenerateOutput
from areal_like.settings.config import RunConfig, TaskConfig, load_config
from areal_like.tasks.environment import ChatRenderer, as_step_result
from areal_like.tasks.task import make_task
from areal_like.tasks.tokenizer import CHATML, bpe_tokenizer
from areal_like.tasks.tools import ToolRegistry, parse_tool_calls
from areal_like.wire.group_checks import content_problem
from areal_like.wire.protocol import Credit, TrajectoryGroup, encode
from areal_like.wire.trajectory import Trajectory, as_f32, as_i32
from rollout_server.episode import EpisodeContext
from rollout_server.facts import RolloutFacts
from rollout_server.multiturn import EpisodeRunner
from rollout_server.server import MAX_EPISODE_FAILURES, RolloutServer
from rollout_server.tool_pool import ToolPool
from trainer.samples import sample_rows

TOK = bpe_tokenizer(512)
EOS = TOK.eos_token_id
CREDIT = Credit(lease_id="l", prompt_index=0, epoch=0, deadline_s=60.0)


class ScriptedEngine:
    """Answers the scripted replies in order; pause_after[k] = n aborts reply k after n tokens."""

    def __init__(self, replies: list[str | None], pause_after: dict[int, int] | None = None):
        self.replies, self.pause_after = list(replies), dict(pause_after or {})
        self.calls: list[tuple[list[int], dict]] = []
        self.version, self.turn, self.left = 0, 0, None
        self.waiting = 0  # calls waiting on a turn that never answers

    async def generate(self, input_ids, params):
        self.calls.append((list(input_ids), dict(params)))
        if self.left is None:  # a new turn
            reply = self.replies[self.turn]
            if reply is None:  # this turn never answers
                self.waiting += 1
                try:
                    await asyncio.Event().wait()
                finally:
                    self.waiting -= 1
            self.left = TOK(reply, add_special_tokens=False)["input_ids"] + [EOS]
        ids, finish = self.left[:params["max_new_tokens"]], "stop"
        if len(ids) < len(self.left):
            finish = "length"
        if (n := self.pause_after.pop(self.turn, None)) is not None:
            ids, finish = self.left[:n], "abort"
        self.left = self.left[len(ids):] if finish == "abort" else None
        version = str(self.version)
        if finish == "abort":
            self.version += 1
        else:
            self.turn += 1
        return GenerateOutput(rid="r", output_ids=ids,
                              logprobs=[-0.01 * (i + 1) for i in range(len(ids))],
                              finish_reason=finish, finish_message="", abort_status=None,
                              weight_version=version)


def runner(engine, tools=None, **task) -> EpisodeRunner:
    cfg = TaskConfig(env=task.pop("env", "agent_envs:Chat"), chat_template=CHATML,
                     group_size=task.pop("group_size", 1),
                     max_new_tokens=task.pop("max_new_tokens", 64), **task)
    ctx = EpisodeContext(client=engine, task=make_task(cfg), tokenizer=TOK,
                         rewards=None, task_cfg=cfg,
                         server_id="s", current_version_fn=lambda: engine.version)
    return EpisodeRunner(ctx, tools)


def episode(engine, tools=None, **task):
    r = runner(engine, tools, **task)
    conv = asyncio.run(r.run(r.ctx.task.example(0)))
    return conv, r.trajectory(conv)


CALL_ADD = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'


def assert_ids_render(conv, traj, messages) -> list[int]:
    """The trajectory's ids are the template's rendering of ``messages`` but its closing "\n"."""
    rendered = ChatRenderer(TOK, CHATML).render(messages, add_generation_prompt=False)
    ids = list(traj.prompt_ids) + list(traj.output_ids)
    newline = TOK("\n", add_special_tokens=False)["input_ids"]
    assert ids + newline == TOK(rendered, add_special_tokens=False)["input_ids"]
    return ids


@pytest.fixture(scope="module")
def tools():
    pool = ToolPool(workers=1, timeout_s=30.0)
    pool.wait_ready()
    yield pool
    pool.close()


def test_ids_are_the_templates_rendering_of_the_final_conversation(tools):
    engine = ScriptedEngine(["hello there", CALL_ADD, "it is 5", "bye"])
    conv, traj = episode(engine, tools)
    assert (conv.finish_reason, conv.turns, traj.reward) == ("stop", 4, 0.25 + 0.25 + 1.0)
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant",
                                                  "user", "assistant", "tool",
                                                  "assistant", "user", "assistant", "user"]
    assert conv.messages[5]["content"] == "5"
    # the last environment message was never sent: the episode is over
    ids = assert_ids_render(conv, traj, conv.messages[:-1])
    # every request was the whole conversation so far, and only generated tokens are trained on
    gen = [TOK(r, add_special_tokens=False)["input_ids"] + [EOS]
           for r in ["hello there", CALL_ADD, "it is 5", "bye"]]
    mask = traj.loss_mask
    assert list(traj.output_ids[mask == 1]) == sum(gen, [])
    assert [c[0] for c in engine.calls] == [ids[:len(traj.prompt_ids) + k]
                                            for k in _turn_starts(mask)]
    assert np.all(traj.behav_logp[mask == 0] == 0) and np.all(traj.behav_logp[mask == 1] < 0)
    assert conv.tool_calls == [{"name": "add", "outcome": "ok",
                                "seconds": conv.tool_calls[0]["seconds"]}]


def _turn_starts(mask: np.ndarray) -> list[int]:
    """Output positions where a generated run begins (each a request's input length)."""
    return [t for t in range(len(mask)) if mask[t] == 1 and (t == 0 or mask[t - 1] == 0)]


def test_bad_tool_calls_become_error_messages_and_the_episode_goes_on(tools):
    bad = ['<tool_call>{"name": "nope", "arguments": {}}</tool_call>',
           '<tool_call>{"name": "add", "arguments": {"a": 2,</tool_call>',
           '<tool_call>{"name": "add", "arguments": {"a": "two", "b": 3}}</tool_call>',
           '<tool_call>{"name": "boom", "arguments": {"reason": "kaput"}}</tool_call>',
           '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 1}}',
           CALL_ADD]
    conv, traj = episode(engine := ScriptedEngine(bad), tools, max_turns=len(bad),
                         max_new_tokens=128)
    assert (conv.finish_reason, conv.turns, len(engine.calls)) == ("max_turns", 6, 6)
    said = [m["content"] for m in conv.messages if m["role"] == "tool"]
    assert said[0].startswith("error: unknown tool 'nope'")
    assert said[1].startswith("error: invalid JSON in tool call")
    assert said[2].startswith("error: invalid arguments for add: a: 'two' is not of type 'integer'")
    assert said[3] == "error: boom raised ValueError: kaput"
    assert said[4].startswith("error: unterminated <tool_call>")
    assert said[5] == "5"  # the pool still works after a tool raised
    assert [c["outcome"] for c in conv.tool_calls] == ["invalid", "invalid", "invalid", "error",
                                                       "invalid", "ok"]


def test_a_tool_past_its_timeout_is_killed_and_reported():
    pool = ToolPool(workers=1, timeout_s=1.0)
    try:
        pool.wait_ready()
        calls = ['<tool_call>{"name": "sleepy", "arguments": {"seconds": 600}}</tool_call>',
                 CALL_ADD]
        conv, _ = episode(ScriptedEngine(calls), pool, max_turns=2, tool_timeout_s=1.0)
        said = [m["content"] for m in conv.messages if m["role"] == "tool"]
        assert said[0] == "error: sleepy did not finish within 1s"
        assert [c["outcome"] for c in conv.tool_calls][0] == "timeout"
        # the new pool may still be starting
        assert said[1] in ("5", "error: add did not finish within 1s")
    finally:
        pool.close()


def test_tool_calls_are_parsed_from_qwen_format():
    calls = parse_tool_calls('x <tool_call>\n{"name": "add", "arguments": '
                             '"{\\"a\\": 1, \\"b\\": 2}"}\n</tool_call>'
                             '<tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}'
                             '</tool_call>')
    assert [(c.name, c.arguments, c.error) for c in calls] == [("add", {"a": 1, "b": 2}, ""),
                                                              ("add", {"a": 3, "b": 4}, "")]
    with pytest.raises(Exception,
                       match="is not valid under any of the given schemas|is not of type"):
        ToolRegistry([{"name": "t", "function": "m:f", "parameters": {"type": 7}}])


@pytest.mark.parametrize("limits,reason", [
    ({"env": "agent_envs:Endless", "max_turns": 3}, "max_turns"),
    ({"env": "agent_envs:Endless", "max_turns": 50, "max_episode_tokens": 120}, "max_tokens"),
    ({"env": "agent_envs:Endless", "turn_timeout_s": 0.2}, "turn_timeout"),
    ({"env": "agent_envs:Stuck", "episode_timeout_s": 0.3}, "episode_timeout"),
])
def test_limits_end_episodes_with_their_finish_reason(limits, reason):
    replies = ["a fairly long reply of many tokens"] * 50
    if reason == "turn_timeout":
        replies[1] = None  # the second turn never answers
    conv, traj = episode(ScriptedEngine(replies), **limits)
    assert conv.finish_reason == reason == traj.finish_reason
    if reason == "max_turns":
        assert conv.turns == 3
    if reason == "max_tokens":
        assert len(traj.prompt_ids) + traj.n_tokens <= 120 and conv.turns >= 2
    # the first turn and its continuation stay; the cut turn is dropped
    if reason == "turn_timeout":
        assert conv.turns == 1 and traj.loss_mask[-1] == 0
    if reason == "episode_timeout":  # cut during a step: messages end with the turn, as ids do
        assert conv.turns == 1 and conv.messages[-1] == {"role": "assistant", "content": replies[0]}
        assert_ids_render(conv, traj, conv.messages)


def test_an_episode_ends_at_the_models_context_when_max_episode_tokens_is_longer():
    # at the model's context (256) with max_tokens, not an HTTP 400
    task = TaskConfig(env="agent_envs:Endless", chat_template=CHATML, group_size=2,
                      max_new_tokens=64, max_turns=50)
    facts = RolloutFacts.from_run(RunConfig(run_dir="/nonexistent", task=task))
    assert task.max_episode_tokens == 1024 and facts.task.max_episode_tokens == 256
    r = runner(ScriptedEngine(["a fairly long reply of many tokens"] * 50),
               **{k: getattr(facts.task, k) for k in ("env", "max_turns", "max_episode_tokens")})
    conv = asyncio.run(r.run(r.ctx.task.example(0)))
    assert conv.finish_reason == "max_tokens" and conv.total_tokens <= 256 and conv.turns >= 2


def test_a_groups_rewards_reach_the_metrics_and_a_prompt_leaving_no_room_is_refused_with_why():
    r = runner(ScriptedEngine(["a", "b", "c"]))
    [traj] = asyncio.run(r.run_group(CREDIT)).trajectories
    value = r.ctx.metrics.registry.get_sample_value
    assert value("areal_rollout_reward_count") == 1  # 0.25 + 0.25 + 1.0 (agent_envs.Chat)
    assert value("areal_rollout_reward_sum") == value("areal_rollout_reward_mean") == 1.5
    context = len(traj.prompt_ids)  # the opening prompt exactly at the context
    r = runner(engine := ScriptedEngine(["a", "b", "c"]), max_episode_tokens=context,
               max_new_tokens=16)
    group = asyncio.run(r.run_group(CREDIT))
    [t] = group.trajectories
    assert (t.n_tokens, t.finish_reason, t.reward, engine.calls) == (0, "no_room", 0.0, [])
    why = content_problem(group, TOK.vocab_size, context, 1)
    assert why == (f"no_room: trajectory 0 has no output tokens: its prompt of {context} tokens "
                   "leaves the engine no room to generate"), why


def test_a_weight_sync_mid_episode_keeps_every_tokens_version_and_its_logged_sample_shows_it():
    replies = ["first turn", "second turn is long", "third"]
    # turn 2 is paused after 3 tokens, resumes at v1
    engine = ScriptedEngine(replies, pause_after={1: 3})
    conv, traj = episode(engine, env="agent_envs:Chat")
    g = [TOK(r, add_special_tokens=False)["input_ids"] + [EOS] for r in replies]
    mask, versions, out = traj.loss_mask, traj.versions, list(traj.output_ids)
    starts = _turn_starts(mask)
    assert len(engine.calls) == 4 and conv.resumed == 1
    # the resubmitted request: everything so far, the 3 tokens included
    resumed_input = engine.calls[2][0]
    assert resumed_input == list(traj.prompt_ids) + out[:starts[1] + 3]
    assert engine.calls[2][1]["max_new_tokens"] == engine.calls[1][1]["max_new_tokens"] - 3
    want = [0] * len(g[0]) + [0] * 3 + [1] * (len(g[1]) - 3) + [1] * len(g[2])
    assert list(versions[mask == 1]) == want
    assert list(versions[mask == 0]) == ([0] * (starts[1] - len(g[0]))
                                         + [1] * (starts[2] - starts[1] - len(g[1])))
    assert traj.head_version == 0 and list(traj.output_ids[mask == 1]) == sum(g, [])
    # a logged sample shows each token's source and version
    group = TrajectoryGroup(group_id="g", server_id="s", lease_id="l", prompt_index=0, epoch=0,
                            trajectories=[traj])
    row = sample_rows([group], version=2, k=1,
                      decode=lambda ids: TOK.decode(ids, skip_special_tokens=False))[0]
    assert row["turns"] == 3 and row["staleness"] == 2 and 0 < row["masked_share"] < 1
    assert [(s["source"], s["version"]) for s in row["segments"]] == [
        ("generated", 0), ("context", 0), ("generated", 0), ("generated", 1), ("context", 1),
        ("generated", 1)]
    assert "".join(s["text"] for s in row["segments"]) == row["response"]
    assert row["segments"][0]["text"] == "first turn<|im_end|>"
    assert row["segments"][1]["text"] == ("\n<|im_start|>user\nread 10<|im_end|>\n"
                                          "<|im_start|>assistant\n")


def test_when_one_conversation_of_a_group_fails_its_siblings_are_cancelled():
    async def group():  # the siblings (and their requests) are cancelled first
        # the first request answers and its env's step raises; the others never answer
        engine = ScriptedEngine(["a", None])
        r = runner(engine, env="agent_envs:Broken", group_size=3)
        with pytest.raises(KeyError, match="missing"):
            await r.run_group(CREDIT)
        assert len(engine.calls) == 3
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return engine.waiting, left

    waiting, left = asyncio.run(group())
    assert (waiting, left) == (0, [])


def test_an_environment_that_raises_is_named_with_its_traceback_when_the_server_stops(caplog):
    server = RolloutServer.from_run(load_config([]))

    async def episodes():
        server.wake = asyncio.Event()
        for _ in range(MAX_EPISODE_FAILURES):
            r = runner(ScriptedEngine(["a"]), env="agent_envs:Broken")
            task = asyncio.create_task(r.run_group(CREDIT))
            await asyncio.gather(task, return_exceptions=True)
            server._episode_done(task)

    with caplog.at_level(logging.ERROR):
        asyncio.run(episodes())
    records = [r for r in caplog.records if "episode" in r.getMessage()]
    assert records[0].getMessage().endswith("failed (1 in a row): KeyError: 'missing'")
    traced = [r.exc_info is not None for r in records]
    assert traced == [False] * (MAX_EPISODE_FAILURES - 1) + [True]
    assert "agent_envs.py" in caplog.text and ", in step" in caplog.text
    assert str(server.failure) == (f"{MAX_EPISODE_FAILURES} episodes failed in a row: "
                                   "KeyError: 'missing'")


def test_numpy_values_in_a_steps_info_go_on_the_wire_and_others_are_named_at_the_step():
    r = runner(ScriptedEngine(["a", "b", "c"]), env="agent_envs:NumpyInfo")
    group = asyncio.run(r.run_group(CREDIT))
    encode(group)
    info = group.trajectories[0].metadata["info"]
    assert info == {"steps": 3, "score": 0.5, "hist": [0, 1, 2], "ok": True, "nested": {"x": 2}}
    assert type(info["score"]) is float and type(info["nested"]["x"]) is int
    with pytest.raises(TypeError, match=r"^environment m:E step returned info\['bad'\] = "
                                        r"<object object at .+ cannot go on the wire"):
        as_step_result(([], 1.0, True, {"fine": 1, "bad": object()}), "m:E")
    with pytest.raises(TypeError, match=r"^environment m:E step returned info \[1\]; expected a "):
        as_step_result(([], 1.0, True, [1]), "m:E")
    for reward in (None, float("nan"), "1.0"):  # a step reward must be a finite number
        with pytest.raises(TypeError, match=r"^environment m:E step returned reward .+; expected "
                                            "a finite"):
            as_step_result(([], reward, True, {}), "m:E")
    assert as_step_result(([], True, True, None), "m:E").reward == 1.0  # a bool counts as 0/1


def test_a_logged_sample_of_an_agent_episode_counts_its_calls_as_turns():
    t = Trajectory.of(prompt_ids=as_i32([1, 2]), output_ids=as_i32([3, 4, 5]),
                      behav_logp=as_f32([-0.5, 0.0, -0.5]), versions=as_i32([0, 0, 0]),
                      loss_mask=as_i32([1, 0, 1]), reward=1.0, finish_reason="stop",
                      metadata={"calls": 2, "segment": 0, "segments": 1, "text": "x"})
    group = TrajectoryGroup(group_id="g", server_id="s", lease_id="l", prompt_index=0, epoch=0,
                            trajectories=[t])
    [row] = sample_rows([group], version=0, k=1, decode=lambda ids: TOK.decode(ids))
    assert row["turns"] == 2


class RoutedEngine(ScriptedEngine):
    """Also answers routes for every position a request ran, all the call's number."""

    def __init__(self, *args, unrouted: int = -1, short: int = -1, **kw):
        super().__init__(*args, **kw)
        self.unrouted, self.short = unrouted, short  # these calls answer no routes, a row short

    async def generate(self, input_ids, params):
        call = len(self.calls)
        out = await super().generate(input_ids, params)
        rows = len(input_ids) + len(out.output_ids) - 1 - (call == self.short)
        routes = np.full((rows, 1, 2), call, "<i4").tobytes() if call != self.unrouted else None
        return dataclasses.replace(out, routed_experts=routes)


@pytest.mark.parametrize("cut", [False, True])
def test_each_position_keeps_the_routes_of_the_turn_that_ran_it_first(cut):
    replies = ["hello there", "it is 5", None if cut else "bye"]
    # the second reply paused after 2 tokens: the resumed call's routes replace the first's
    conv, traj = episode(RoutedEngine(replies, pause_after={1: 2}), env="agent_envs:Endless",
                         max_turns=3, turn_timeout_s=0.2 if cut else 30.0)
    mask, p = traj.loss_mask, len(traj.prompt_ids)
    # turn k's request ran up to its own last token but one: output position end_k - 1
    ends = [t + 1 for t in range(len(mask)) if mask[t] == 1 and (t + 1 == len(mask)
                                                                  or mask[t + 1] == 0)]
    want, ran = [], 0
    for call, end in zip([0, 2, 3], ends):  # (call 1: the aborted segment, re-run by call 2)
        want += [call] * (p + end - 1 - ran)
        ran = p + end - 1
    assert len(ends) == conv.turns == (2 if cut else 3)
    if cut:  # the third call never answered: the context after turn 2 is not in the trajectory
        assert mask[-1] == 1 and len(traj.output_ids) < len(conv.output_ids)
    routes = traj.routed_experts.reshape(-1, 1, 2)
    assert routes[:, 0, 0].tolist() == want and len(want) == p + len(mask) - 1


@pytest.mark.parametrize("fault", ["unrouted", "short"])
def test_a_turn_without_routes_leaves_the_trajectory_without_any(fault):
    conv, traj = episode(RoutedEngine(["hello there", "it is 5", "bye"], **{fault: 1}),
                         env="agent_envs:Endless", max_turns=3)
    assert traj.routed_experts is None and len(traj.output_ids) == len(conv.output_ids)
