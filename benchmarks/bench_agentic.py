"""Asynchronous versus synchronous RL on long-tail multi-turn episodes, on the same machine in one
run.

As ``bench_async.py`` (same measurement, same JSON convention), but every group is a set of
multi-turn conversations whose turn counts follow a heavy tail (``areal_like/tasks/envs.py``:
LongTail; ``configs/experiment/bench_agentic.yaml``): most episodes take a turn or two, a few take
up to 16, and a synchronous step waits for its slowest group. The system runs twice, with eta = 0
and eta = 4, the rollout pool and the trainer pool pinned to disjoint cores (launch.pin_cpus).

One JSON line: figure = achieved speedup (trained samples/s at eta 4 over eta 0), baseline = the
ideal speedup (G + T) / max(G, T) from the synchronous run's measured phases, ratio = achieved /
ideal (goal >= 0.8), and the turn distribution the episodes had.

``--agent``: the same episodes written as an agent with the ``openai`` SDK
(``benchmarks/agentic_agent.py``: long_tail_agent; run from the repository root, which the rollout
server's agent workers import it from) through the rollout server's agent endpoint
(``rollout_server/agent_endpoint.py``) instead of the environment. ``--overhead``: no job; the
endpoint's cost per call against a direct engine call (embedded engine, greedy, the same prompt
and token count every way, the ways interleaved call by call, medians): one JSON line, figure =
extra milliseconds per call through the endpoint with the SDK (the client's own cost included,
as an agent pays it), baseline = milliseconds of the direct call, ratio = direct / endpoint
milliseconds (higher is better); ``plain_http_extra_ms`` the same as plain HTTP.

    python benchmarks/bench_agentic.py [--steps 20] [--groups 8] [--agent] [--overhead]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_async import run_job, speedup_line  # noqa: E402
from transport_report import at_least, load_warning  # noqa: E402

from areal_like.settings.config import load_config  # noqa: E402
from areal_like.tasks.envs import LongTail  # noqa: E402
from areal_like.tasks.task import make_task  # noqa: E402

AGENT = ["task.env=", "task.agent=benchmarks.agentic_agent:long_tail_agent", "task.agent_workers=8"]


def run_once(run_dir: Path, eta: int, args) -> list[dict]:
    cfg = load_config(["experiment=bench_agentic", f"buffer.groups_per_step={args.groups}",
                       f"buffer.max_staleness={eta}", f"trainer.steps={args.steps}",
                       f"trainer.micro_batch_size={8 * args.groups}", f"run_dir={run_dir}",
                       *(AGENT if args.agent else [])])
    return run_job(cfg, run_dir, eta)


async def overhead(calls: int, tokens: int) -> dict:
    """Milliseconds per call: a direct ``generate_sample`` and the same call through the endpoint
    (with the ``openai`` SDK, and as plain HTTP)."""
    import aiohttp
    from openai import AsyncOpenAI

    from areal_like.engines.sglang import SGLangClient
    from areal_like.settings.config import EngineConfig, ModelConfig
    from areal_like.tasks.tokenizer import char_tokenizer
    from rollout_server.agent_endpoint import AgentEndpoint
    from rollout_server.engine import EmbeddedEngine
    from rollout_server.episode import EpisodeContext, generate_sample

    cfg = load_config(["experiment=bench_agentic", *AGENT, f"task.max_new_tokens={tokens}",
                       "task.top_k=1", f"task.max_turns={2 * calls + 4}"]).task
    engine = EmbeddedEngine(ModelConfig(max_position_embeddings=1024), EngineConfig()).start()
    client = SGLangClient(engine.url, local=engine)
    ctx = EpisodeContext(client=client, task=make_task(cfg), tokenizer=char_tokenizer(),
                         rewards=None, task_cfg=cfg, server_id="bench",
                         current_version_fn=lambda: 0)
    ep = await AgentEndpoint(ctx).start()
    key, session = ep.open_session(None)
    sdk = AsyncOpenAI(base_url=ep.base_url, api_key=key, max_retries=0)
    messages = [{"role": "user", "content": "12345*67"}]
    ids = ctx.tokenizer.apply_chat_template(messages, chat_template=cfg.chat_template,
                                            tokenize=True, add_generation_prompt=True,
                                            return_dict=False)
    http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"})

    async def direct():
        return await generate_sample(client, ids, ctx.sampling_params(), tokens, lambda: 0)

    async def plain():  # the same call as plain HTTP: the SDK's own cost left out
        async with http.post(ep.base_url + "/chat/completions",
                             json={"model": "m", "messages": messages}) as r:
            assert r.status == 200, await r.text()

    async def with_sdk():
        return await sdk.chat.completions.create(model="m", messages=messages)

    ways = {"direct": direct, "sdk": with_sdk, "plain": plain}
    try:
        times, last = await _interleaved(ways, calls)
    finally:
        await http.close()
        await sdk.close()
        await ep.close()
        await client.close()
        engine.stop()
    done = last["direct"]
    assert last["sdk"].usage.completion_tokens == len(done.output_ids)  # the same work both ways
    direct_ms, endpoint_ms, raw_ms = (statistics.median(times[k]) for k in ways)
    return {**overhead_line(direct_ms, endpoint_ms), "calls": calls,
            "plain_http_extra_ms": round(raw_ms - direct_ms, 3),
            "tokens_per_call": len(done.output_ids), "statistic": "median per call",
            "prompt_tokens": len(ids), **load_warning()}


def overhead_line(direct_ms: float, endpoint_ms: float) -> dict:
    """The line's common keys: ratio = direct / endpoint, the share of a call's time that is the
    engine's (higher is better)."""
    return {"name": "agent_endpoint_overhead_per_call", "figure": round(endpoint_ms - direct_ms, 3),
            "unit": "ms per call (endpoint - direct)", "baseline": round(direct_ms, 3),
            "ratio": round(direct_ms / endpoint_ms, 3), "goal": None}


async def _interleaved(ways: dict, calls: int) -> tuple[dict[str, list[float]], dict]:
    """Milliseconds of each way's ``calls`` calls after two warm-up rounds, and its last answer;
    the ways interleaved, so a load change hits them all alike."""
    times: dict[str, list[float]] = {k: [] for k in ways}
    last: dict = {}
    for i in range(calls + 2):
        for name, way in ways.items():
            t0 = time.perf_counter()
            out = await way()
            if i >= 2:
                times[name].append(1000 * (time.perf_counter() - t0))
            last[name] = out
    return times, last


def turn_distribution(n: int = 2000) -> dict[str, float]:
    """Turn counts of the first ``n`` training prompts (what the episodes draw)."""
    task = make_task(load_config(["experiment=bench_agentic"]).task)
    turns = sorted(min(LongTail.TAIL_MAX_TURNS,
                       int(random.Random(task.example(i).prompt)
                           .paretovariate(LongTail.TAIL_ALPHA)))
                   for i in range(n))
    return {"mean": round(sum(turns) / n, 2), "p50": turns[n // 2], "p90": turns[int(n * 0.9)],
            "max": turns[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=at_least(1), default=20)
    ap.add_argument("--skip", type=at_least(0), default=4,
                    help="warm-up steps left out of every figure")
    ap.add_argument("--groups", type=at_least(1), default=8, help="groups per step (x8 samples)")
    ap.add_argument("--keep", default=None, help="keep both run directories under this path")
    ap.add_argument("--agent", action="store_true", help="episodes as an openai-SDK agent")
    ap.add_argument("--overhead", action="store_true", help="the agent endpoint's cost per call")
    ap.add_argument("--calls", type=at_least(1), default=50, help="--overhead: calls each way")
    args = ap.parse_args()
    if args.overhead:
        print(json.dumps(asyncio.run(overhead(args.calls, 16))))
        return
    name = "agent_endpoint" if args.agent else "agentic"
    line = speedup_line(f"{name}_async_vs_sync_speedup", "bench_agentic_", run_once, args)
    print(json.dumps({**line, "turns": turn_distribution()}))

if __name__ == "__main__":
    main()
