"""1,000 concurrent requests against a standalone engine process (the rollout server's engine,
with its API key from the environment and the default limits): every request gets an answer,
a generation or 429/503, the process never dies, its RSS stays bounded, and it serves normally
afterwards. The RSS figures are printed (pytest -s) for the record."""

from __future__ import annotations

import asyncio
import collections
import threading

import aiohttp
import psutil

from areal_like.net.auth import ENGINE_KEY_ENV
from areal_like.net.http_guard import HttpLimits

KEY = "load-test-key"
REQUESTS = 1000
BODY = {"input_ids": [1, 5, 7], "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
RSS_BOUND = 256 * 2**20  # what 1,000 requests may add to the engine's RSS
PROCESS_START_S = 180.0


def engine_url(proc) -> str:
    """The URL from the ``ENGINE_URL`` line the engine prints once it serves (bounded wait)."""
    found: list[str] = []
    done = threading.Event()

    def pump():
        for line in proc.stdout:
            if line.startswith("ENGINE_URL"):
                found.append(line.split()[1])
                break
        done.set()
    threading.Thread(target=pump, daemon=True).start()
    assert done.wait(PROCESS_START_S) and found, "the engine did not print ENGINE_URL"
    return found[0]


async def burst(url: str, n: int, key: str | None = KEY) -> collections.Counter:
    """``n`` concurrent /generate calls; counts status codes (and client-side errors by name)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True),
                                     headers=headers, timeout=timeout) as session:
        async def one():
            try:
                async with session.post(url + "/generate", json=BODY) as r:
                    await r.read()
                    return r.status
            except aiohttp.ClientError as e:
                return type(e).__name__
        return collections.Counter(await asyncio.gather(*(one() for _ in range(n))))


def test_a_thousand_concurrent_requests_get_answers_and_rss_stays_bounded(spawn_python):
    proc = spawn_python("rollout_server.engine", ["--port", "0",
                                                  "model.max_position_embeddings=128",
                                                  "rollout.engine.max_running_requests=16"],
                        env={ENGINE_KEY_ENV: KEY})
    # never let its log pipe fill
    threading.Thread(target=lambda: proc.stderr.read(), daemon=True).start()
    url = engine_url(proc)
    engine = psutil.Process(proc.pid)
    # warm: the steady state the burst is measured against
    assert asyncio.run(burst(url, 8)) == {200: 8}
    assert asyncio.run(burst(url, 4, key=None)) == {401: 4}
    rss_before = engine.memory_info().rss
    got = asyncio.run(burst(url, REQUESTS))
    rss_after = engine.memory_info().rss
    again = asyncio.run(burst(url, REQUESTS))
    rss_again = engine.memory_info().rss
    print(f"\n1000 concurrent: {dict(got)}; again: {dict(again)}; threads {engine.num_threads()}; "
          f"RSS before {rss_before / 2**20:.0f} MiB, after {rss_after / 2**20:.0f} MiB, "
          f"after a second burst {rss_again / 2**20:.0f} MiB")
    for counts in (got, again):
        assert sum(counts.values()) == REQUESTS and set(counts) <= {200, 429, 503}, counts
        # as many as the cap admits at once are served
        assert counts[200] >= HttpLimits().max_inflight
    assert proc.poll() is None
    assert rss_after - rss_before < RSS_BOUND and rss_again - rss_before < RSS_BOUND
    assert asyncio.run(burst(url, 4)) == {200: 4}
    proc.terminate()
    assert proc.wait(timeout=60) == 0
