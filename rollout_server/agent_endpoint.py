"""The agent endpoint: an OpenAI-compatible chat API on each rollout server whose every call is a
generate call of the episode it belongs to, recorded token by token for training.

An episode gets an ``EpisodeSession`` and its own API key (``open_session``). How a call extends a
segment or starts a new one, and which trajectories an episode leaves: rollout_server/ROLLOUT.md,
"Agent episodes".

Invariants (rollout_server/ROLLOUT.md, "Agent episodes", has the table of limits):
* only a live session's key gets in (else 401, counted by the guard, ``http_guard.py``); a key of
  an ended episode gets 410 and its call is not recorded, nor generated when it was still waiting
  for the episode's previous call;
* ``task.max_turns`` calls per episode, a refused one too, ``max_tokens`` at most
  ``task.max_new_tokens``, bodies up to ``MAX_BODY_BYTES`` (413), JSON nested at most
  ``agent_chat.MAX_NESTING`` levels (400);
* a call that leaves the engine no room (a segment's tokens at ``task.max_episode_tokens``, or an
  input the engine refuses, ``EpisodeContext.max_input``) is not sent: 400 with OpenAI's code
  ``context_length_exceeded``; it ends its segment as ``max_tokens``, and an episode's first call
  leaves a ``no_room`` trajectory, as a multi-turn episode does (``multiturn.py``);
* it listens on ``rollout.engine.host`` as set (loopback by default), also on a job of several
  nodes, where the engine listens toward the head node instead: only the server's own agent
  workers call it;
* its calls reach the engine through the server's engine client, whose answers are bounded
  (areal_like/net/answers.py).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field

import jinja2
from aiohttp import web

from areal_like.engines.client import EngineError
from areal_like.net.http_guard import HttpLimits, guarded_app, serve
from areal_like.tasks.environment import ChatRenderer, TemplateError, env_template
from areal_like.wire.group_checks import NO_ROOM
from areal_like.wire.trajectory import Trajectory
from rollout_server import agent_chat
from rollout_server.agent_chat import RequestError
from rollout_server.episode import (
    EpisodeContext,
    Sample,
    Transcript,
    generate_sample,
    output_room,
)

MAX_BODY_BYTES = 1 << 20  # a long conversation is tens of kB; a MiB bounds what one call may cost
ENDED_KEPT = 4096  # keys of ended episodes remembered (answered 410, not 401)
LIMITS = HttpLimits(max_body_bytes=MAX_BODY_BYTES, body_timeout_s=30.0, max_connections=256,
                    max_inflight=128)


@dataclass(eq=False, kw_only=True)
class Segment(Transcript):
    """One consistent prefix: the ids of its trajectory and the last call that extended it."""

    calls: int = 0
    keys: list[str] = field(default_factory=list)  # the last call's messages (agent_chat.key)
    reply: str = ""  # key of the assistant message it answered
    render: list[dict] = field(default_factory=list)  # that call's template messages
    text: str = ""  # and the text it generated
    generated: list[int] = field(default_factory=list)  # and the ids
    tools: str = ""  # that call's tools (JSON): other tools render another prefix

    def add(self, context: list[int], sample: Sample) -> None:
        self.add_context(context, (sample.versions or [0])[0])
        self.add_generated(sample)
        self.calls += 1
        self.finish_reason = sample.finish_reason


@dataclass(eq=False)
class EpisodeSession:
    """One episode's calls: its segments, the texts it generated, whether it is still open."""

    example: object
    segments: list[Segment] = field(default_factory=list)
    generated: dict[str, str] = field(default_factory=dict)  # reply key -> generated text
    calls: int = 0
    open: bool = True
    last: Segment | None = None  # the segment the latest recorded call extended
    no_room: Segment | None = None  # its first call, which left no room (then no segment)
    out_of_room: bool = False  # a call was refused for lack of room (agent_episode.py)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one call at a time per episode

    @property
    def splits(self) -> int:
        return max(0, len(self.segments) - 1)


class NoRoom(RequestError):
    """A call that leaves the engine no room to generate (module docstring)."""


class AgentEndpoint:
    """The HTTP side and the sessions of one rollout server (module docstring)."""

    def __init__(self, ctx: EpisodeContext, host: str = "127.0.0.1", port: int = 0,
                 tool_format: str = "hermes", model: str = "areal-like"):
        self.ctx, self.cfg, self.host, self.port = ctx, ctx.task_cfg, host, port
        self.tool_format, self.model = tool_format, model
        self.template = env_template(ctx.tokenizer, ctx.task_cfg)
        self.sessions: dict[bytes, EpisodeSession] = {}
        self.ended: OrderedDict[bytes, None] = OrderedDict()
        self.server = None
        self.stats = None  # the guard's counts (they outlive close)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> AgentEndpoint:
        app = guarded_app(limits=LIMITS, token=self.known_key)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_route("*", "/{path:.*}", self.not_served)  # e.g. the Responses API
        self.server = await serve(app, self.host, self.port)
        self.port, self.stats = self.server.port, self.server.stats
        self.ctx.metrics.count_refusals("agent", lambda: self.unauthorized)  # 401s
        return self

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def unauthorized(self) -> int:
        return self.stats.unauthorized if self.stats else 0

    # ------------------------------------------------------------------ sessions
    def open_session(self, example) -> tuple[str, EpisodeSession]:
        api_key = secrets.token_urlsafe(32)
        session = EpisodeSession(example)
        self.sessions[_digest(api_key)] = session
        return api_key, session

    def close_session(self, api_key: str) -> None:
        digest = _digest(api_key)
        session = self.sessions.pop(digest, None)
        if session is not None:
            session.open = False
            self.ended[digest] = None
            while len(self.ended) > ENDED_KEPT:
                self.ended.popitem(last=False)

    def known_key(self, header: str | None) -> bool:
        """The guard's check: a bearer of a live or recently ended session."""
        if not header or not header.startswith("Bearer "):
            return False
        digest = _digest(header[len("Bearer "):].strip())  # a dict lookup by a hash: no timing hint
        return digest in self.sessions or digest in self.ended

    # ------------------------------------------------------------------ routes
    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response(agent_chat.models(self.model))

    async def not_served(self, request: web.Request) -> web.Response:
        return _error(404, f"{request.method} {request.path} is not served here; the agent "
                      "endpoint serves POST /v1/chat/completions and GET /v1/models", "not_found")

    async def chat(self, request: web.Request) -> web.Response:
        bearer = request.headers["Authorization"][len("Bearer "):].strip()  # the guard checked it
        session = self.sessions.get(_digest(bearer))
        if session is None:
            return self._ended()
        if session.calls >= self.cfg.max_turns:  # every call counts, a refused one too
            return self._refuse(f"this episode's {self.cfg.max_turns} calls are used up "
                                "(task.max_turns)")
        session.calls += 1
        try:
            body = json.loads(await request.read())
        except RecursionError:
            return self._refuse(agent_chat.TOO_DEEP)
        except ValueError:
            return self._refuse("the body is not valid JSON")
        try:
            req = agent_chat.check_request(body)
            async with session.lock:
                if not session.open:  # it ended while this call waited for the one before
                    return self._ended()
                answer = await self.complete(session, req)
        except NoRoom as e:  # the code OpenAI's clients and agent frameworks recognise
            self._count("no_room")
            return _error(400, str(e), "invalid_request_error", "context_length_exceeded",
                          "messages")
        except RequestError as e:
            return self._refuse(str(e))
        except jinja2.TemplateError as e:  # the chat template refused the conversation
            return self._refuse(f"the chat template cannot render these messages: {e}")
        except EngineError as e:
            self._count("engine_error")
            return _error(400 if e.status and e.status < 500 else 502, str(e), "engine_error")
        self._count("ok")
        if req["stream"]:
            return web.Response(body=agent_chat.stream_events(answer),
                                content_type="text/event-stream")
        return web.json_response(answer)

    def _ended(self) -> web.Response:
        self._count("ended")
        return _error(410, "this episode has ended", "episode_ended")

    def _refuse(self, why: str) -> web.Response:
        self._count("refused")
        return _error(400, why, "invalid_request_error")

    async def complete(self, session: EpisodeSession, req: dict) -> dict:
        """One call (module docstring): place it, generate, record, answer."""
        messages, tools = req["messages"], req["tools"]
        renderer = ChatRenderer(self.ctx.tokenizer, self.template, tools or None)
        keys, tools_key = [agent_chat.key(m) for m in messages], json.dumps(tools, sort_keys=True)
        seg, context, render = self.place(session, messages, keys, tools_key, renderer)
        ids, ctx = seg.prompt_ids + seg.output_ids + context, self.ctx
        asked = min(req["max_tokens"] or self.cfg.max_new_tokens, self.cfg.max_new_tokens)
        budget = output_room(len(ids), self.cfg, self.cfg.max_episode_tokens, asked, ctx.max_input)
        if budget <= 0:
            self.end_without_room(session, seg)
            raise NoRoom(self.no_room_message(len(ids)))
        sample = await generate_sample(ctx.client, ids, ctx.sampling_params(), budget,
                                       ctx.current_version_fn, ctx.metrics)
        text = ctx.tokenizer.decode(sample.output_ids, skip_special_tokens=True)
        content, calls = agent_chat.parse_assistant(text, self.tool_format, tools)
        reply = {"role": "assistant", "content": content, "tool_calls": calls}
        answer = agent_chat.completion(self.model, content, calls, sample.finish_reason, len(ids),
                                       len(sample.output_ids))
        if not session.open:  # ended while it generated: answered, not recorded
            return answer
        if seg not in session.segments:
            session.segments.append(seg)
            self._count_split(session)
        seg.add(context, sample)
        seg.keys, seg.reply, seg.render, seg.tools = keys, agent_chat.key(reply), render, tools_key
        seg.text, seg.generated = text, sample.output_ids
        session.generated[seg.reply] = text
        session.last = seg
        return answer

    def end_without_room(self, session: EpisodeSession, seg: Segment) -> None:
        """Record a call without room: the segment it extends ends as ``max_tokens``; an
        episode's first call is its ``no_room`` trajectory (``trajectories``)."""
        session.out_of_room = True
        if seg in session.segments:
            seg.finish_reason = "max_tokens"
        elif not session.segments and session.no_room is None:
            seg.finish_reason, session.no_room = NO_ROOM, seg

    def no_room_message(self, tokens: int) -> str:
        limit, max_input = self.cfg.max_episode_tokens, self.ctx.max_input
        why = f"task.max_episode_tokens={limit}"
        if 0 < max_input <= tokens:
            limit, why = max_input, f"the engine refuses an input of {max_input} tokens or more"
        # the code in the text too: langchain-openai looks for it in str(error), which the
        # openai SDK (3.x) makes of the message alone
        return (f"This model's maximum context length is {limit} tokens. However, your messages "
                f"resulted in {tokens} tokens. Please reduce the length of the messages. "
                f"(context_length_exceeded: no room left to generate: {why})")

    def place(self, session: EpisodeSession, messages: list[dict], keys: list[str],
              tools_key: str, renderer: ChatRenderer) -> tuple[Segment, list[int], list[dict]]:
        """(segment, context ids before the generation, the call's template messages): the
        newest segment this call extends, else a new one rendered from scratch."""
        for seg in reversed(session.segments):
            k = len(seg.keys)
            if seg.tools != tools_key or keys[:k] != seg.keys or keys[k:k + 1] != [seg.reply]:
                continue
            new = agent_chat.template_messages(messages, session.generated)[k + 1:]
            try:
                context = renderer.continuation_ids(seg.render, seg.text, seg.generated, new)
            except TemplateError:
                continue
            return seg, context, seg.render + [{"role": "assistant", "content": seg.text}] + new
        render = agent_chat.template_messages(messages, session.generated)
        return Segment(prompt_ids=renderer.prompt_ids(render)), [], render

    # ------------------------------------------------------------------ results
    def trajectories(self, session: EpisodeSession, reward: float, meta: dict) -> list[Trajectory]:
        """One trajectory per segment, each with the episode's reward; none made: the first call's,
        without output, when it left no room (module docstring)."""
        if not session.segments and session.no_room is not None:
            return [session.no_room.trajectory(reward, {**meta, "calls": 0}, NO_ROOM)]
        out = []
        for i, seg in enumerate(session.segments):
            said = seg.render + [{"role": "assistant", "content": seg.text}]
            out.append(seg.trajectory(reward, {
                **meta, "calls": seg.calls, "segment": i, "segments": len(session.segments),
                "messages": said, "text": seg.text}, meta.get("finish_reason", "")))
        return out

    def _count(self, outcome: str) -> None:
        self.ctx.metrics.counter("rollout/agent_calls", "agent endpoint calls by outcome",
                                 ("outcome",)).labels(outcome=outcome).inc()

    def _count_split(self, session: EpisodeSession) -> None:
        if session.splits:
            self.ctx.metrics.counter("rollout/agent_splits", "agent episodes split where the agent "
                                     "rewrote its history (an extra trajectory each)").inc()


def _digest(api_key: str) -> bytes:
    # a header's undecodable bytes are surrogates: hashed as they are (401, never a 500)
    return hashlib.sha256(api_key.encode(errors="surrogatepass")).digest()


def _error(status: int, message: str, kind: str, code: str = "",
           param: str | None = None) -> web.Response:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return web.json_response({"error": {"message": message, "type": kind, "param": param,
                                        "code": code or kind}}, status=status)
