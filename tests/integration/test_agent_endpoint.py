"""The agent endpoint (rollout_server/agent_endpoint.py) with the real openai client, on Scripted
replies (below) or the embedded engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import aiohttp
import pytest
import yaml
from openai import (
    APIStatusError,
    AsyncOpenAI,
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    NotFoundError,
)

from areal_like.engines.client import EngineError, GenerateOutput
from areal_like.engines.sglang import SGLangClient
from areal_like.net.metrics import Metrics, scrape
from areal_like.settings.config import EngineConfig, ModelConfig, TaskConfig
from areal_like.tasks.agents import calc_agent, langgraph_calc_agent
from areal_like.tasks.environment import ChatRenderer
from areal_like.tasks.task import make_task
from areal_like.tasks.tokenizer import EOS_ID, char_tokenizer
from areal_like.wire import protocol as P
from areal_like.wire.group_checks import content_problem
from areal_like.wire.protocol import Credit
from rollout_server import agent_chat, agent_endpoint
from rollout_server.agent_endpoint import MAX_BODY_BYTES, AgentEndpoint
from rollout_server.agent_episode import AgentRunner, agent_pool
from rollout_server.episode import EpisodeContext
from rollout_server.reward_pool import RewardPool

REPO = Path(__file__).resolve().parents[2]
CALC = yaml.safe_load((REPO / "configs/task/calc.yaml").read_text())
TOK = char_tokenizer()
CALL = '<tool_call>{"name":"calc","arguments":{"e":"%s"}}</tool_call>'


def ids(text: str) -> list[int]:
    return [int(t) for t in TOK(text, add_special_tokens=False)["input_ids"]]


class Scripted:
    """Answers the scripted replies in order (EOS, cut to max_new_tokens); records requests."""

    def __init__(self, replies: list[str]):
        self.replies, self.calls = list(replies), []

    async def generate(self, input_ids, params):
        self.calls.append((list(input_ids), dict(params)))
        out = (ids(self.replies.pop(0)) + [EOS_ID])[:params["max_new_tokens"]]
        return GenerateOutput(rid="r", output_ids=out, logprobs=[-0.5] * len(out),
                              finish_reason="stop", finish_message="", abort_status=None,
                              weight_version="3")


class Recording:
    """A real engine's client that keeps every ``/generate`` answer."""

    def __init__(self, client: SGLangClient):
        self.client, self.outs = client, []

    async def generate(self, input_ids, params):
        out = await self.client.generate(input_ids, params)
        self.outs.append(out)
        return out


def task_cfg(**over) -> TaskConfig:
    fields = dict(name="calc", chat_template=CALC["chat_template"], max_new_tokens=72, max_turns=3,
                  max_episode_tokens=240, group_size=1, agent="areal_like.tasks.agents:calc_agent")
    return TaskConfig(**{**fields, **over})


def endpoint(client, version=lambda: 3, rewards=None, **over) -> AgentEndpoint:
    cfg = task_cfg(**over)
    ctx = EpisodeContext(client=client, task=make_task(cfg), tokenizer=TOK, rewards=rewards,
                         task_cfg=cfg, server_id="s", current_version_fn=version)
    return AgentEndpoint(ctx)


@contextlib.asynccontextmanager
async def started(engine, metrics=None, max_input=0, **over):
    ep = endpoint(engine, **over)
    ep.ctx.metrics, ep.ctx.max_input = metrics or ep.ctx.metrics, max_input
    await ep.start()
    try:
        yield ep
    finally:
        await ep.close()


@contextlib.asynccontextmanager
async def opened(engine, example=None, **kw):
    """A started endpoint, one open session and an openai client with its key."""
    async with started(engine, **kw) as ep:
        key, session = ep.open_session(example)
        async with AsyncOpenAI(base_url=ep.base_url, api_key=key, max_retries=0) as sdk:
            yield ep, key, session, sdk


async def _until(condition, timeout_s: float = 30.0) -> None:
    async def poll():
        while not condition():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), timeout_s)


def run_group(pool, engine, **kw) -> P.TrajectoryGroup:
    """One group of prompt 0, its agents run by ``pool`` against an endpoint on ``engine``."""
    async def one():
        async with started(engine, **kw) as ep:
            credit = Credit(lease_id="l1", prompt_index=0, epoch=0, deadline_s=60.0)
            return await AgentRunner(ep.ctx, ep, pool).run_group(credit)
    return asyncio.run(one())


@pytest.fixture(scope="module")
def pool():
    p = agent_pool(task_cfg(agent_workers=1, episode_timeout_s=30.0))
    p.wait_ready(120)
    yield p
    p.close()


def rendering(messages: list[dict]) -> list[int]:
    renderer = ChatRenderer(TOK, CALC["chat_template"])
    return renderer.encode(renderer.render(messages, add_generation_prompt=False))


@pytest.mark.parametrize("agent", [calc_agent, langgraph_calc_agent],
                         ids=["openai_sdk", "langgraph"])
def test_calc_agent_round_trip_is_one_trajectory_of_the_templates_rendering(agent):
    example = make_task(task_cfg()).example(0)
    a, b = example.prompt.split("*")
    engine = Scripted([CALL % example.prompt, example.answer])

    async def scenario():
        async with opened(engine, example) as (ep, key, session, _):
            reward = await agent(ep.base_url, key, example)
            ep.close_session(key)
            return reward, session, ep

    reward, session, ep = asyncio.run(scenario())
    assert reward == 1.0 and int(a) * int(b) == int(example.answer)
    [traj] = ep.trajectories(session, reward, {})
    final = [{"role": "user", "content": example.prompt},
             {"role": "assistant", "content": CALL % example.prompt},
             {"role": "tool", "content": example.answer},
             {"role": "assistant", "content": example.answer}]
    seq = list(traj.prompt_ids) + list(traj.output_ids)
    assert seq + ids("|") == rendering(final)  # the template closes the last turn with "|"
    generated = ids(CALL % example.prompt) + [EOS_ID] + ids(example.answer) + [EOS_ID]
    assert list(traj.output_ids[traj.loss_mask == 1]) == generated
    assert [c[0] for c in engine.calls] == [seq[:len(traj.prompt_ids)],
                                            seq[:len(seq) - len(ids(example.answer)) - 1]]
    assert set(traj.versions) == {3} and traj.reward == 1.0
    assert set(traj.behav_logp[traj.loss_mask == 1]) == {-0.5}
    assert set(traj.behav_logp[traj.loss_mask == 0]) == {0.0}
    assert (traj.metadata["calls"], session.splits) == (2, 0)


def test_the_openai_schema_round_trip_with_tool_calls_and_a_streamed_call():
    """A stream is the whole answer as one chunk, and is recorded; other APIs are named."""
    engine = Scripted([CALL % "6*7" + CALL % "1+1", "42", CALL % "6*7"])
    tools = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}]
    user = [{"role": "user", "content": "6*7"}]

    async def scenario():
        async with opened(engine, max_new_tokens=128) as (_, _, session, client):
            first = await client.chat.completions.create(model="m", messages=user, tools=tools,
                                                         max_tokens=500)
            msgs = [*user, first.choices[0].message,
                    {"role": "tool", "tool_call_id": first.choices[0].message.tool_calls[0].id,
                     "content": "42"}]
            second = await client.chat.completions.create(model="m", messages=msgs, tools=tools)
            stream = await client.chat.completions.create(model="m", messages=user, tools=tools,
                                                          stream=True)
            chunks = [c async for c in stream]
            with pytest.raises(NotFoundError) as responses:
                await client.responses.create(model="m", input="q")
            with pytest.raises(NotFoundError) as legacy:
                await client.completions.create(model="m", prompt="q")
            return (first, second, chunks, session, await client.models.list(),
                    responses.value.message, legacy.value.message)

    first, second, chunks, session, models, responses, legacy = asyncio.run(scenario())
    msg = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and msg.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [
        ("calc", {"e": "6*7"}), ("calc", {"e": "1+1"})]
    assert len({c.id for c in msg.tool_calls}) == 2
    assert first.usage.completion_tokens == len(ids(CALL % "6*7" + CALL % "1+1")) + 1
    assert engine.calls[0][1]["max_new_tokens"] == 128  # capped at task.max_new_tokens
    assert (second.choices[0].message.content, second.choices[0].finish_reason) == ("42", "stop")
    assert second.choices[0].message.tool_calls is None
    [chunk] = chunks
    [call] = chunk.choices[0].delta.tool_calls
    assert call.index == 0 and call.function.name == "calc"
    assert json.loads(call.function.arguments) == {"e": "6*7"}
    assert chunk.choices[0].finish_reason == "tool_calls"
    assert session.last.generated == ids(CALL % "6*7") + [EOS_ID]
    assert [m.id for m in models.data] == ["areal-like"]
    assert "POST /v1/responses is not served" in responses
    assert "POST /v1/completions is not served" in legacy
    assert "POST /v1/chat/completions and GET /v1/models" in responses


def test_tool_calls_parse_in_two_model_families_formats_and_null_fields_are_defaults():
    tools = [{"type": "function", "function": {"name": "calc"}}]
    hermes = agent_chat.parse_assistant('ok <tool_call>{"name": "calc", "arguments": {"e": "2"}}'
                                        '</tool_call>', "hermes", tools)
    mistral = agent_chat.parse_assistant('[TOOL_CALLS][{"name": "calc", "arguments": {"e": "2"}}, '
                                         '{"name": "calc", "arguments": {"e": "3"}}]', "mistral",
                                         tools)
    assert hermes[0] == "ok" and [c["function"]["arguments"] for c in hermes[1]] == ['{"e": "2"}']
    assert [json.loads(c["function"]["arguments"]) for c in mistral[1]] == [{"e": "2"}, {"e": "3"}]
    broken = '<tool_call>{"name": "calc", "argu'
    assert agent_chat.parse_assistant(broken, "hermes", tools) == (broken, [])  # plain content
    assert agent_chat.parse_assistant(CALL % "1", "hermes", []) == (CALL % "1", [])  # no tools
    user = [{"role": "user", "content": "q"}]  # n: null is one call
    assert agent_chat.check_request({"messages": user, "n": None})["messages"] == user
    both = agent_chat.check_request({"messages": user, "max_completion_tokens": None,
                                     "max_tokens": 5})
    newer = agent_chat.check_request({"messages": user, "max_completion_tokens": 3,
                                      "max_tokens": 5})
    assert (both["max_tokens"], newer["max_tokens"]) == (5, 3)


def test_a_history_rewrite_splits_the_episode_and_each_part_is_its_rendering():
    engine = Scripted(["hi", "ok", "fine", "done"])

    async def scenario():
        async with opened(engine, max_turns=4) as (ep, key, session, client):
            history = [{"role": "user", "content": "a"}]
            r1 = (await client.chat.completions.create(model="m", messages=history)).choices[0]
            history += [r1.message, {"role": "user", "content": "b"}]
            await client.chat.completions.create(model="m", messages=history)  # extends: same part
            rewritten = [{"role": "user", "content": "summary: a b"}]  # drops its earlier turns
            r3 = (await client.chat.completions.create(model="m", messages=rewritten)).choices[0]
            await client.chat.completions.create(model="m", messages=rewritten + [
                {"role": "assistant", "content": r3.message.content},
                {"role": "user", "content": "c"}])
            ep.close_session(key)
            return ep, session

    ep, session = asyncio.run(scenario())
    first, second = ep.trajectories(session, 0.5, {})
    assert (session.splits, first.metadata["calls"], second.metadata["calls"]) == (1, 2, 2)
    assert first.reward == second.reward == 0.5
    convs = [[("user", "a"), ("assistant", "hi"), ("user", "b"), ("assistant", "ok")],
             [("user", "summary: a b"), ("assistant", "fine"), ("user", "c"),
              ("assistant", "done")]]
    for traj, conv in zip((first, second), convs):
        seq = list(traj.prompt_ids) + list(traj.output_ids)
        assert seq + ids("|") == rendering([{"role": r, "content": c} for r, c in conv])
        assert TOK.decode(list(traj.output_ids[traj.loss_mask == 1])) == \
            "".join(c + "<eos>" for r, c in conv if r == "assistant")


def test_a_special_token_generated_mid_turn_does_not_double_its_eos():
    """Content drops generated special tokens; the next context renders the model's own."""
    engine = Scripted(["x<pad>y", "z"])

    async def scenario():
        async with opened(engine) as (_, _, session, client):
            history = [{"role": "user", "content": "a"}]
            r1 = (await client.chat.completions.create(model="m", messages=history)).choices[0]
            await client.chat.completions.create(model="m", messages=history + [
                r1.message, {"role": "user", "content": "b"}])
            return r1.message.content, session

    content, session = asyncio.run(scenario())
    assert content == "xy" and session.splits == 0
    assert engine.calls[1][0] == ids("user:a|assistant:x<pad>y<eos>|user:b|assistant:")


def test_only_the_episodes_key_gets_in_and_late_calls_get_4xx():
    engine, metrics = Scripted(["x", "y"]), Metrics()

    async def scenario():
        async with opened(engine, metrics=metrics) as (ep, key_a, a, _):
            key_b, b = ep.open_session(None)
            user = [{"role": "user", "content": "q"}]
            for stranger in ("wrong", key_a[:-1]):
                with pytest.raises(AuthenticationError) as refused:
                    sdk = AsyncOpenAI(base_url=ep.base_url, api_key=stranger, max_retries=0)
                    await sdk.chat.completions.create(model="m", messages=user)
                assert "wrong bearer token" in refused.value.message  # the SDK reads error.message
            async with aiohttp.ClientSession() as http:  # no key at all
                url = ep.base_url + "/chat/completions"
                async with http.post(url, json={"messages": user}) as r:
                    assert r.status == 401
            # a key of bytes that are not UTF-8: a 401, once a UnicodeEncodeError (500) in the guard
            reader, writer = await asyncio.open_connection("127.0.0.1", ep.port)
            writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe"
                         b"\r\nConnection: close\r\n\r\n")
            assert (await reader.readline()).split()[1] == b"401"
            writer.close()
            with pytest.raises(AuthenticationError):
                await AsyncOpenAI(base_url=ep.base_url, api_key="wrong",
                                  max_retries=0).models.list()
            strangers = ep.unauthorized
            await AsyncOpenAI(base_url=ep.base_url, api_key=key_b,
                              max_retries=0).chat.completions.create(model="m", messages=user)
            ep.close_session(key_a)
            late = AsyncOpenAI(base_url=ep.base_url, api_key=key_a, max_retries=0)
            with pytest.raises(Exception) as ended:
                await late.chat.completions.create(model="m", messages=user)
            return strangers, ended.value, a, b, ep.unauthorized

    strangers, ended, a, b, unauthorized = asyncio.run(scenario())
    assert strangers == unauthorized == 5  # every stranger counted; members are not
    assert metrics.registry.get_sample_value("areal_refused_total", {"port": "agent"}) == 5
    assert getattr(ended, "status_code", None) == 410
    assert (len(a.segments), len(b.segments), len(engine.calls)) == (0, 1, 1)


def test_calls_size_and_sampling_are_bounded():
    engine = Scripted(["1", "2", "3"])

    async def scenario():
        # 3 refused, 1 without room, 1 answered: 5 calls; the 6th is one too many
        async with opened(engine, max_turns=5, max_episode_tokens=40) as (_, _, _, client):
            user = [{"role": "user", "content": "q"}]
            refused = []
            for extra in ({"n": 2}, {"extra_body": {"stream": "yes"}}, {"max_tokens": 0}):
                with pytest.raises(BadRequestError) as e:
                    await client.chat.completions.create(model="m", messages=user, **extra)
                refused.append(e.value.message)
            with pytest.raises(BadRequestError) as room:  # the prompt leaves no room
                await client.chat.completions.create(model="m", messages=[
                    {"role": "user", "content": "q" * 40}])
            await client.chat.completions.create(model="m", messages=user, max_tokens=1,
                                                 temperature=0.1)
            with pytest.raises(BadRequestError) as used_up:
                await client.chat.completions.create(model="m", messages=user)
            with pytest.raises(Exception) as big:
                await client.chat.completions.create(model="m", messages=[
                    {"role": "user", "content": "q" * MAX_BODY_BYTES}])
            return refused, room.value, used_up.value, big.value

    refused, room, used_up, big = asyncio.run(scenario())
    assert "n must be 1" in refused[0] and "stream must be" in refused[1]
    assert "max_tokens" in refused[2]
    assert "no room left" in room.message and "calls are used up" in used_up.message
    assert getattr(big, "status_code", None) == 413 and "request body over" in big.message
    [(_, params)] = engine.calls  # only the one call in bounds reached the engine
    assert params["max_new_tokens"] == 1 and params["temperature"] == 1.0  # the task's, not 0.1


class Held(Scripted):
    """``Scripted`` whose calls wait, once they have started, until ``release`` is set."""

    def __init__(self, replies: list[str]):
        super().__init__(replies)
        self.started, self.release = asyncio.Event(), asyncio.Event()

    async def generate(self, input_ids, params):
        self.started.set()
        await self.release.wait()
        return await super().generate(input_ids, params)


class InputLimited(Scripted):
    """Refuses max_input tokens or more with a 400, as SGLang's max_req_input_len."""

    def __init__(self, replies: list[str], max_input: int):
        super().__init__(replies)
        self.max_input, self.refused = max_input, 0

    async def generate(self, input_ids, params):
        if len(input_ids) >= self.max_input:
            self.refused += 1
            raise EngineError("/generate", 400, f"The input ({len(input_ids)} tokens) is longer "
                              "than the model's context length")
        return await super().generate(input_ids, params)

    async def weight_version(self):  # what meet_engine asks
        return "default"

    async def server_info(self):
        return {"max_req_input_len": self.max_input}


def test_a_call_without_room_is_openais_context_length_exceeded_and_is_recorded():
    """No room: OpenAI's context_length_exceeded before the engine; no_room or max_tokens."""
    from langchain_core.exceptions import ContextOverflowError
    from langchain_openai import ChatOpenAI

    engine = InputLimited(["1"], max_input=40)
    user = [{"role": "user", "content": "q"}]

    async def scenario():
        async with opened(engine, metrics=Metrics(), max_input=engine.max_input,
                          max_episode_tokens=30) as (ep, first, opening, _):
            later, extended = ep.open_session(None)
            errors = []
            # 56 and 31 tokens: past the engine's input limit, past max_episode_tokens
            for key, text in ((first, "q" * 40), (first, "q" * 15)):
                sdk = AsyncOpenAI(base_url=ep.base_url, api_key=key, max_retries=0)
                with pytest.raises(BadRequestError) as refused:
                    await sdk.chat.completions.create(model="m", messages=[
                        {"role": "user", "content": text}])
                errors.append(refused.value)
                await sdk.close()
            chat = ChatOpenAI(model="m", base_url=ep.base_url, api_key=first, max_retries=0)
            with pytest.raises(ContextOverflowError):
                await chat.ainvoke("q" * 40)
            sdk = AsyncOpenAI(base_url=ep.base_url, api_key=later, max_retries=0)
            reply = await sdk.chat.completions.create(model="m", messages=user)
            with pytest.raises(BadRequestError):
                await sdk.chat.completions.create(model="m", messages=user + [
                    reply.choices[0].message, {"role": "user", "content": "q" * 30}])
            await sdk.close()
            return errors, ep.trajectories(opening, 0.0, {"finish_reason": "error"}), \
                ep.trajectories(extended, 0.0, {}), ep.ctx.metrics

    errors, [opening], [extended], metrics = asyncio.run(scenario())
    for e, why in zip(errors, ("the engine refuses an input of 40 tokens or more",
                               "task.max_episode_tokens=30")):
        assert (e.status_code, e.code, e.type, e.param) == (
            400, "context_length_exceeded", "invalid_request_error", "messages")
        assert "maximum context length" in e.message and why in e.message, e.message
    assert engine.refused == 0 and len(engine.calls) == 1  # only the call with room was sent
    assert (opening.n_tokens, opening.finish_reason) == (0, "no_room")
    assert content_problem(P.TrajectoryGroup(
        group_id="g", server_id="s", lease_id="l", prompt_index=0, epoch=0,
        trajectories=[opening]), TOK.vocab_size).startswith("no_room:")
    assert extended.n_tokens > 0 and extended.finish_reason == "max_tokens"
    assert metrics.registry.get_sample_value("areal_rollout_agent_calls_total",
                                             {"outcome": "no_room"}) == 4


def test_a_group_whose_opening_prompt_leaves_no_room_is_refused_as_no_room_not_failed(pool):
    trajectories = run_group(pool, InputLimited([], 5), max_input=5, group_size=2).trajectories
    assert [(t.n_tokens, t.finish_reason) for t in trajectories] == [(0, "no_room")] * 2
    why = content_problem(P.TrajectoryGroup(group_id="g", server_id="s", lease_id="l1",
                                            prompt_index=0, epoch=0, trajectories=trajectories),
                          TOK.vocab_size)
    assert why.startswith("no_room:"), why


@pytest.mark.parametrize("agent", ["calc_agent", "langgraph_calc_agent"])
def test_an_agent_that_raises_on_a_later_call_without_room_ends_as_max_tokens(agent, pool):
    example, metrics = make_task(task_cfg()).example(0), Metrics()
    # the opening call has room; the second (the tool's answer added) is past the input limit
    [t] = run_group(pool, InputLimited([CALL % example.prompt], max_input=80), metrics=metrics,
                    max_input=80, agent=f"areal_like.tasks.agents:{agent}").trajectories
    assert (t.finish_reason, t.reward, t.metadata["calls"]) == ("max_tokens", 0.0, 1)
    assert "context_length_exceeded" in t.metadata["agent_error"], t.metadata
    assert metrics.registry.get_sample_value("areal_rollout_agent_episodes_total",
                                             {"outcome": "max_tokens"}) == 1


def test_the_agent_endpoint_knows_the_input_limit_the_engine_reports():
    from areal_like.settings.config import RunConfig
    from rollout_server.server import RolloutServer

    engine = InputLimited(["1"], max_input=30)
    cfg = RunConfig(run_dir="/nonexistent", task=task_cfg())
    cfg.rollout.engine.kind, cfg.rollout.engine.url = "url", "http://127.0.0.1:9"
    server = RolloutServer.from_run(cfg)
    server.client, server.tokenizer = engine, TOK
    server.task, server.rewards = make_task(cfg.task), None

    async def scenario():
        await server.meet_engine()
        try:
            key, _ = server.agent_endpoint.open_session(None)
            sdk = AsyncOpenAI(base_url=server.agent_endpoint.base_url, api_key=key, max_retries=0)
            with pytest.raises(BadRequestError) as refused:
                await sdk.chat.completions.create(model="m", messages=[
                    {"role": "user", "content": "q" * 30}])
            await sdk.close()
            return refused.value
        finally:
            await server.agent_endpoint.close()

    refused = asyncio.run(scenario())
    assert refused.code == "context_length_exceeded" and engine.refused == 0


@pytest.fixture(scope="module")
def engine():
    from rollout_server.engine import EmbeddedEngine

    e = EmbeddedEngine(ModelConfig(max_position_embeddings=512),
                       EngineConfig(max_running_requests=8)).start()
    yield e
    e.stop()


def test_recorded_ids_are_what_the_real_engine_generated(engine):
    async def scenario():
        async with SGLangClient(engine.url, local=engine) as client, \
                opened(rec := Recording(client), version=lambda: 0) as (ep, _, session, sdk):
            user = [{"role": "user", "content": "12*34"}]
            reply = await sdk.chat.completions.create(model="m", messages=user)
            await sdk.chat.completions.create(model="m", messages=user + [
                reply.choices[0].message, {"role": "user", "content": "again"}])
            return ep.trajectories(session, 0.0, {}), rec.outs, reply

    [traj], outs, reply = asyncio.run(scenario())
    mask = traj.loss_mask == 1
    assert list(traj.output_ids[mask]) == outs[0].output_ids + outs[1].output_ids
    assert list(traj.behav_logp[mask]) == pytest.approx(outs[0].logprobs + outs[1].logprobs, abs=0)
    assert set(traj.versions) == {0}
    said = TOK.decode(outs[0].output_ids, skip_special_tokens=True)
    assert reply.choices[0].message.content == said
    assert list(traj.prompt_ids) == ids("user:12*34|assistant:")


def test_a_weight_sync_in_the_middle_of_a_call_keeps_every_tokens_version(engine, tmp_path):
    from areal_like.weights.hf import build_model

    build_model(ModelConfig(max_position_embeddings=512, init_seed=7)).save_pretrained(tmp_path)
    TOK.save_pretrained(tmp_path)
    served = {"v": 0}

    async def scenario():
        async with SGLangClient(engine.url, local=engine) as client, \
                opened(rec := Recording(client), version=lambda: served["v"], top_k=1,
                       max_new_tokens=400, max_episode_tokens=480) as (ep, _, session, sdk):
            call = asyncio.create_task(sdk.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "go"}]))
            await _wait_for_tokens(engine.url, 20)
            await client.pause_generation("abort")
            await client.update_weights_from_disk(str(tmp_path), weight_version="1")
            served["v"] = 1
            await client.continue_generation()
            await call
            return ep.trajectories(session, 0.0, {}), rec.outs

    [traj], outs = asyncio.run(scenario())
    assert [o.finish_reason for o in outs][0] == "abort" and outs[-1].finish_reason != "abort"
    assert list(traj.output_ids) == sum((o.output_ids for o in outs), [])
    expected = sum(([int(o.weight_version)] * len(o.output_ids) for o in outs), [])
    assert list(traj.versions) == expected and expected[0] == 0 and expected[-1] == 1
    assert list(traj.behav_logp) == pytest.approx(sum((o.logprobs for o in outs), []), abs=0)


async def _wait_for_tokens(url: str, n: int, timeout_s: float = 60.0) -> None:
    """Until the engine has generated ``n`` tokens (a deadline, not a sleep)."""
    async def generated() -> float:
        page = await asyncio.to_thread(scrape, f"{url}/metrics", 30.0)
        return sum(v for k, v in page.items() if k.startswith("sglang:generation_tokens_total"))

    async def poll(start: float) -> None:
        while await generated() - start < n:
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(await generated()), timeout_s)


def test_agents_that_hang_crash_or_say_no_number_are_scored_0_with_their_reason():
    example = make_task(task_cfg()).example(0)
    agents = {"areal_like.tasks.agents:calc_agent": (1.0, ""),
              "agent_fns:crashes": (0.0, "agent raised RuntimeError: agent bug"),
              "agent_fns:says_words": (0.0, "not a number"),
              "agent_fns:leaves_it_to_the_reward": (1.0, ""),  # the task's reward: exact match
              # a bool counts as 0/1, as a reward function's does
              "agent_fns:says_true": (1.0, ""), "agent_fns:says_false": (0.0, "")}
    metrics = Metrics()

    def ended() -> float:
        return metrics.registry.get_sample_value("areal_rollout_agent_calls_total",
                                                 {"outcome": "ended"}) or 0.0

    async def one(path: str, late_calls: int = 0, engine=None):
        replies = [CALL % example.prompt, example.answer]
        engine = engine or Scripted(replies[1:] if "reward" in path or late_calls else replies)
        async with started(engine, metrics=metrics, agent=path, episode_timeout_s=10.0,
                           rewards=rewards) as ep:
            runner = AgentRunner(ep.ctx, ep, pool)
            credit = Credit(lease_id="l1", prompt_index=0, epoch=0, deadline_s=60.0)
            trajectories = (await runner.run_group(credit)).trajectories
            # the agent's stray thread calls after the episode
            await _until(lambda: ended() >= late_calls)
            return trajectories

    async def failed(path: str) -> str:
        with pytest.raises(RuntimeError, match="called the model") as e:
            await one(f"agent_fns:{path}")
        return str(e.value)

    async def scenario():
        hung = Scripted([CALL % example.prompt])
        hang = asyncio.create_task(one("agent_fns:hangs", engine=hung))
        await _until(lambda: hung.calls)  # it hangs on one worker; the rest run on the other
        scored = {path: (await one(path))[0] for path in agents}
        # a group whose agents all fail before calling fails, saying the agents' reason
        failures = {path: await failed(path)
                    for path in ("never_calls", "fails_before_calling", "hogs_memory")}
        [late] = await one("agent_fns:calls_after_its_end", late_calls=1)
        return {**scored, "agent_fns:hangs": (await hang)[0]}, failures, late

    pool = agent_pool(task_cfg(agent_workers=2, episode_timeout_s=10.0))
    rewards = RewardPool(task_cfg(reward_workers=0), make_task(task_cfg()).reward_path)
    try:
        pool.wait_ready(120)
        scored, failures, late = asyncio.run(scenario())
    finally:
        pool.close()
        rewards.close()
    for path, (reward, why) in {**agents, "agent_fns:hangs": (0.0, "did not finish")}.items():
        traj = scored[path]
        assert traj.reward == reward, (path, traj.metadata)
        assert why in traj.metadata.get("agent_error", ""), (path, traj.metadata)
        assert bool(why) == ("agent_error" in traj.metadata), (path, traj.metadata)
    assert "ValueError: no such model: gpt-5" in failures["fails_before_calling"]
    assert "ran out of memory" in failures["hogs_memory"]
    assert "task.agent_memory_mb=4096" in failures["hogs_memory"]
    assert (late.metadata["calls"], late.reward, ended()) == (1, 1.0, 1.0)  # 410, not recorded


def test_a_client_an_agent_leaves_open_does_not_break_the_next_episode(capfd, pool):
    example = make_task(task_cfg()).example(0)

    async def one():
        async with started(Scripted(["x"]), agent="agent_fns:leaves_its_client_open") as ep:
            return await AgentRunner(ep.ctx, ep, pool).run(example)

    runs = [asyncio.run(one()) for _ in range(4)]
    assert [[t.reward for t in run] for run in runs] == [[0.0], [1.0]] * 2  # it raised, it did not
    assert "Event loop is closed" not in capfd.readouterr().err


def test_an_agent_and_an_environment_together_are_refused():
    from areal_like.settings.config import ConfigError

    for over, key in (({"env": "areal_like.tasks.envs:Calculator"}, "task.agent"),
                      ({"agent_tool_format": "pythonic"}, "agent_tool_format"),
                      ({"chat_template": "none"}, "task.chat_template")):  # an agent talks in chat
        with pytest.raises(ConfigError, match=key):
            task_cfg(**over)


def test_preflight_names_an_agent_that_cannot_run(monkeypatch):
    from types import SimpleNamespace

    from launch.preflight import check_agent

    def problems(path):
        return check_agent(SimpleNamespace(task=SimpleNamespace(agent=path)))

    assert problems("") == [] and problems("areal_like.tasks.agents:calc_agent") == []
    assert "cannot be loaded: ModuleNotFoundError" in problems("no_such_pkg.mod:run")[0]
    assert "not a callable" in problems("areal_like.tasks.envs:GUESS_MAX")[0]
    assert "cannot be called as run(client_base_url, api_key, example)" in \
        problems("areal_like.tasks.envs:calc")[0]
    # the endpoint answers in the openai package's types (the agent extra): named in one line
    monkeypatch.setitem(__import__("sys").modules, "openai", None)  # as if not installed
    [problem] = problems("areal_like.tasks.agents:calc_agent")  # it imports openai when it runs
    assert "openai" in problem and "pip install -e '.[agent]'" in problem


def test_calls_in_flight_when_their_episode_ends_are_not_recorded():
    """The call generating is answered; the one waiting its turn gets 410, generating nothing."""
    engine = Held(["first", "second"])

    async def scenario():
        async with opened(engine) as (ep, key, session, sdk):
            user = [{"role": "user", "content": "q"}]
            first = asyncio.create_task(sdk.chat.completions.create(model="m", messages=user))
            await asyncio.wait_for(engine.started.wait(), 30)
            second = asyncio.create_task(sdk.chat.completions.create(model="m", messages=user))
            await _until(lambda: session.calls == 2)  # it waits for the first one's turn
            ep.close_session(key)
            engine.release.set()
            with pytest.raises(APIStatusError) as late:
                await second
            return await first, late.value, session

    answer, late, session = asyncio.run(scenario())
    assert answer.choices[0].message.content == "first"
    assert late.status_code == 410 and "this episode has ended" in late.message
    assert len(engine.calls) == 1 and session.segments == [] and not session.generated


def test_the_connection_cap_answers_in_the_openai_error_shape():
    cap = agent_endpoint.LIMITS.max_connections

    async def scenario():
        async with opened(Scripted([])) as (ep, _, _, sdk):
            holders = []
            try:
                for _ in range(cap):
                    holders.append((await asyncio.open_connection("127.0.0.1", ep.port))[1])
                await _until(lambda: ep.stats.connections == cap)  # silent: none can be evicted
                with pytest.raises(InternalServerError) as busy:
                    await sdk.chat.completions.create(model="m",
                                                      messages=[{"role": "user", "content": "q"}])
                return busy.value
            finally:
                for holder in holders:
                    holder.close()

    busy = asyncio.run(scenario())
    # openai 3 shows the error's message alone, openai 2 (what verifiers 0.4 pins) the whole body
    assert busy.status_code == 503 and "too many open connections" in busy.message
    assert busy.body == {"message": "too many open connections", "code": 503}


def posted(engine, bodies: list, **over) -> tuple[list[tuple[int, str]], object]:
    """(status, error message) of each body POSTed to /chat/completions in one session."""
    async def scenario():
        async with opened(engine, **over) as (ep, key, session, _):
            out = []
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
                for body in bodies:
                    data = body if isinstance(body, bytes) else json.dumps(body).encode()
                    async with http.post(ep.base_url + "/chat/completions", data=data) as r:
                        out.append((r.status, (await r.json()).get("error", {}).get("message", "")))
            return out, session
    return asyncio.run(scenario())


def test_bad_bodies_get_400_and_count_toward_the_episodes_calls():
    """Bad JSON, no messages, a refusing template, ids or names of a wrong type: 400, not 500."""
    raising = "{{ raise_exception('no tools here') if messages[0]['role'] == 'tool' else 'x' }}"
    user = {"role": "user", "content": "q"}
    call = {"id": "c1", "function": {"name": "calc", "arguments": "{}"}}
    said = {"role": "assistant", "content": ""}
    wrong_types = [[user, {"role": "tool", "tool_call_id": [1], "content": "x"}],
                   [user, {**said, "tool_calls": [{**call, "id": [1]}]}],
                   [user, {**said, "tool_calls": [{**call, "function": {"name": ["calc"],
                                                                        "arguments": "{}"}}]}],
                   [user, {"role": "tool", "name": {"a": 1}, "content": "x"}]]
    engine = Scripted(["1", "2"])
    statuses, session = posted(engine, [b"{not json", {"messages": []},
                                        {"messages": [{"role": "tool", "content": "1"}]},
                                        *({"messages": m} for m in wrong_types),
                                        {"messages": [user]}, {"messages": [user]}],
                               chat_template=raising, max_turns=8)
    assert [s for s, _ in statuses] == [400] * 7 + [200, 400], statuses
    assert statuses[0][1] == "the body is not valid JSON"
    assert "cannot render" in statuses[2][1] and "no tools here" in statuses[2][1]
    assert "calls are used up" in statuses[8][1] and session.calls == 8
    assert len(engine.calls) == len(session.segments) == 1


def test_a_deeply_nested_message_or_tool_gets_a_clear_400_not_500():
    """Nesting past MAX_NESTING (or the recursion limit) is a 400; arguments as text are kept."""
    def body(depth: int, as_text: bool) -> bytes:
        deep = "[" * depth + "]" * depth
        arguments = json.dumps(deep) if as_text else deep
        return ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", '
                '"content": "", "tool_calls": [{"id": "c1", "function": {"name": "calc", '
                f'"arguments": {arguments}}}}}]}}]}}').encode()

    depths = [*range(65, 1000, 97), *range(940, 1000), 200_000]  # MAX_NESTING = 64
    engine = Scripted(["a"] * len(depths))
    statuses, _ = posted(engine, [body(d, t) for d in depths for t in (False, True)],
                         max_turns=4 * len(depths), max_episode_tokens=10**6)
    got = dict(zip([(d, t) for d in depths for t in (False, True)], statuses))
    assert not [k for k, (status, _) in got.items() if status >= 500], got
    nested = {k: v for k, v in got.items() if not k[1]}
    assert all(s == 400 and ("nested deeper than" in t or "not valid JSON" in t)
               for s, t in nested.values()), nested
    assert "nested deeper than 64 levels" in got[depths[0], False][1]
    assert all(s == 200 for (_, as_text), (s, _) in got.items() if as_text)
    assert len(engine.calls) == len(depths)  # only the calls with their arguments as text
