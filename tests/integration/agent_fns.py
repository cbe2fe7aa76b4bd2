"""Agents the agent-endpoint tests name by dotted path (``agent_fns:hangs``): module level, so an
agent worker process imports them as a rollout server's would."""

from __future__ import annotations

import gc
import threading
import time

from openai import AsyncOpenAI, OpenAI


def _ask(base_url: str, api_key: str, example) -> None:
    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    user = {"role": "user", "content": example.prompt}
    client.chat.completions.create(model="policy", messages=[user])


def hangs(base_url: str, api_key: str, example) -> float:
    _ask(base_url, api_key, example)
    time.sleep(3600)
    return 1.0


def crashes(base_url: str, api_key: str, example) -> float:
    _ask(base_url, api_key, example)
    raise RuntimeError("agent bug")


def says_words(base_url: str, api_key: str, example) -> str:
    _ask(base_url, api_key, example)
    return "very good"


def says_true(base_url: str, api_key: str, example) -> bool:
    _ask(base_url, api_key, example)
    return True


def says_false(base_url: str, api_key: str, example) -> bool:
    _ask(base_url, api_key, example)
    return False


async def never_calls(base_url: str, api_key: str, example) -> float:
    return 1.0


def leaves_it_to_the_reward(base_url: str, api_key: str, example) -> None:
    _ask(base_url, api_key, example)
    return None


def calls_after_its_end(base_url: str, api_key: str, example) -> float:
    _ask(base_url, api_key, example)

    def late() -> None:
        time.sleep(1.0)  # the episode has ended by then
        try:
            _ask(base_url, api_key, example)
        except Exception:  # noqa: BLE001 - refused, as it must be
            pass

    threading.Thread(target=late, daemon=True).start()
    return 1.0


def hogs_memory(base_url: str, api_key: str, example) -> float:
    bytearray(64 << 30)  # past any agent_memory_mb: MemoryError, nothing touched
    return 1.0


def fails_before_calling(base_url: str, api_key: str, example) -> float:
    raise ValueError("no such model: gpt-5")


_episodes = [0]


async def leaves_its_client_open(base_url: str, api_key: str, example) -> float:
    """AGENTS.md's agent: its ``AsyncOpenAI`` client is never closed; every other episode it
    raises after its call (the traceback keeps the client until the worker has replied)."""
    gc.collect()  # the collection that comes, sooner or later, in the next episode
    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    await client.chat.completions.create(model="policy", messages=[
        {"role": "user", "content": example.prompt}])
    _episodes[0] += 1
    if _episodes[0] % 2:
        raise RuntimeError("agent bug")
    return 1.0
