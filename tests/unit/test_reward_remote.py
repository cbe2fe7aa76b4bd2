"""RewardPool with task.reward_url: one JSON batch per group to a real aiohttp server on
127.0.0.1 (an ephemeral port), with a timeout per attempt and bounded retries."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from areal_like.net.auth import REWARD_AUTH_ENV
from areal_like.net.metrics import Metrics
from areal_like.settings.config import TaskConfig
from rollout_server.reward_pool import RewardPool


@dataclass(frozen=True)
class MetaExample:  # what a dataset task's example carries: its other columns as metadata
    prompt: str
    answer: str
    metadata: dict = field(default_factory=dict)


EXAMPLE = MetaExample("Half of 3?", "1.5", {"source": "unit", "level": 2})


class RewardServer:
    """Answers ``{"rewards": [float(response), ...]}``; ``mode`` scripts failures; keeps bodies."""

    def __init__(self, mode: str = "ok"):
        self.mode, self.bodies, self.auth = mode, [], []
        self.release = asyncio.Event()  # ends a hanging handler, so the server stops promptly

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        self.auth.append(request.headers.get("Authorization"))
        rewards = [float(item["response"]) for item in body["items"]]
        if self.mode == "always_500" or (self.mode == "fails_twice" and len(self.bodies) <= 2):
            return web.json_response({"error": "busy"}, status=500)
        if self.mode == "hang":
            await self.release.wait()
        if self.mode == "wrong_length":
            rewards = rewards[:-1]
        if self.mode == "one_bad":
            rewards[1] = "x"
        if self.mode == "huge":  # 8 MiB of padding around the rewards
            return web.json_response({"rewards": rewards, "pad": "x" * (8 << 20)})
        return web.json_response({"rewards": rewards})


def run(mode: str, responses: list[str], metrics: Metrics | None = None,
        **task) -> tuple[list, RewardServer]:
    async def main():
        server = RewardServer(mode)
        app = web.Application()
        app.router.add_post("/score", server.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))  # ephemeral: the kernel picks a free port
        await web.SockSite(runner, sock).start()
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/score"
        pool = RewardPool(TaskConfig(reward_url=url, **{"reward_timeout_s": 2.0, **task}),
                          "unused:path", metrics)
        try:
            return await pool.score_group(EXAMPLE.prompt, responses, EXAMPLE), server
        finally:
            pool.close()
            server.release.set()
            await runner.cleanup()

    return asyncio.run(main())


def test_one_batch_per_group_in_order():
    metrics = Metrics()
    got, server = run("ok", ["1", "0.5", "0"], metrics)
    assert got == [(1.0, None), (0.5, None), (0.0, None)]
    assert server.bodies == [{"items": [
        {"prompt": "Half of 3?", "response": r, "answer": "1.5",
         "metadata": {"source": "unit", "level": 2}}
        for r in ("1", "0.5", "0")]}]
    assert metrics.registry.get_sample_value("areal_rollout_reward_seconds_count") == 1


@pytest.mark.parametrize("mode, responses, task, want, posts", [
    ("one_bad", ["1", "1", "0.5"], {},  # only its item scores 0
     [(1.0, None), (0.0, "remote reward: reward is not a number: 'x'"), (0.5, None)], 1),
    ("fails_twice", ["1", "0"], {"reward_retries": 2}, [(1.0, None), (0.0, None)], 3),
    ("hang", ["1"], {"reward_timeout_s": 1.0, "reward_retries": 1},
     [(0.0, "remote reward: timeout after 1.0s (attempt 2 of 2)")], 2),
    ("wrong_length", ["1", "1", "1"], {"reward_retries": 2},  # not retried
     [(0.0, "remote reward: expected {'rewards': [3 numbers]}, got 2 rewards (attempt 1 of 3)")]
     * 3, 1),
    ("always_500", ["1", "1"], {"reward_retries": 2},
     [(0.0, "remote reward: HTTP 500 (attempt 3 of 3)")] * 2, 3),
])
def test_a_failing_server_is_retried_or_not_and_scores_zero_with_the_reason(mode, responses, task,
                                                                           want, posts):
    metrics = Metrics()
    got, server = run(mode, responses, metrics, **task)
    assert got == want and len(server.bodies) == posts
    # each sample scored 0 for a reason is one failure
    assert (metrics.registry.get_sample_value("areal_rollout_reward_failures_total",
                                              {"kind": "remote"}) or 0.0) == sum(
        why is not None for _, why in want)


def test_an_unreachable_url_scores_zero_with_the_reason():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    port = sock.getsockname()[1]
    try:
        async def main():
            pool = RewardPool(TaskConfig(reward_url=f"http://127.0.0.1:{port}/", reward_retries=0),
                              "unused:path")
            try:
                return await pool.score(EXAMPLE.prompt, "1", EXAMPLE)
            finally:
                pool.close()
        reward, reason = asyncio.run(main())
    finally:
        sock.close()
    assert (reward == 0.0 and reason.startswith("remote reward: ClientConnectorError")
            and "attempt 1 of 1" in reason)


def test_the_credential_comes_from_the_environment_as_the_authorization_header(monkeypatch):
    """``REWARD_AUTH_ENV`` goes with every request (task.reward_url may carry no credential)."""
    _, server = run("ok", ["1"])
    assert server.auth == [None]
    monkeypatch.setenv(REWARD_AUTH_ENV, "Bearer hunter2")
    got, server = run("fails_twice", ["1", "0"], reward_retries=2)
    assert got == [(1.0, None), (0.0, None)] and server.auth == ["Bearer hunter2"] * 3


def test_an_answer_past_what_the_group_needs_is_refused_unread_and_not_retried():
    """An answer is read up to what ``{"rewards": [n numbers]}`` can take; past it, every response
    scores 0 with the reason, once."""
    got, server = run("huge", ["1", "0"], reward_retries=2)
    assert len(server.bodies) == 1, "retried"
    assert [r for r, _ in got] == [0.0, 0.0]
    assert all("over its limit of" in why for _, why in got), got
