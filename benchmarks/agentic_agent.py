"""``benchmarks/bench_agentic.py --agent``: the ``LongTail`` environment's episodes as an agent
written with the ``openai`` SDK (``task.agent=benchmarks.agentic_agent:long_tail_agent``; the job
runs from the repository root, the rollout server's working directory, so this module imports
there as the user's own agent code would)."""

from __future__ import annotations

from areal_like.tasks.envs import LongTail


async def long_tail_agent(client_base_url: str, api_key: str, example) -> float:
    from openai import AsyncOpenAI

    env = LongTail()
    messages: list = env.reset(example)
    client = AsyncOpenAI(base_url=client_base_url, api_key=api_key, max_retries=0)
    try:
        for _ in range(env.left):
            reply = (await client.chat.completions.create(model="policy", messages=messages)
                     ).choices[0].message
            said, reward, done, _ = env.step(reply.content or "")
            if done:
                return reward
            messages += [reply, *said]
        return 0.0
    finally:
        await client.close()
