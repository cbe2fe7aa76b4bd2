"""Embedded engine throughput vs transformers ``generate`` with static batches (same model, same prompts).

Workload: ``--requests`` prompts of U[16, 64] tokens, per-request ``max_new_tokens`` ~ U[8, 256],
EOS disabled (``ignore_eos``), so both sides produce exactly the same useful tokens: the sum of
the per-request limits. The model is a Qwen2 built from a config (hidden 512, 4 layers, vocab
4096, fp32), big enough that a forward pass is not pure Python overhead.

- engine: all requests submitted at once to the scheduler (``--via scheduler``, default: its
  thread-safe Python API, no HTTP) or POSTed concurrently to ``/generate`` (``--via http``), with
  ``max_running_requests = --batch``; requests join and leave the batch every step.
- baseline: ``model.generate`` on left-padded static batches of ``--batch`` prompts (greedy,
  sampling off, KV cache on); a batch runs until its longest request is done, and only each
  row's own ``max_new_tokens`` count as useful tokens.

Prints one JSON line: ``figure`` = engine tokens/s, ``baseline`` = generate tokens/s, ``ratio``.
Run: ``.venv/bin/python benchmarks/bench_engine.py`` (about a minute on 2 busy cores).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from areal_like.config import EngineConfig, ModelConfig  # noqa: E402
from areal_like.hf import build_model  # noqa: E402

BENCH_MODEL = ModelConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
WAIT_S = 900.0


def workload(n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(4, BENCH_MODEL.vocab_size, (int(k),), generator=g).tolist()
               for k in torch.randint(16, 65, (n,), generator=g)]
    limits = torch.randint(8, 257, (n,), generator=g).tolist()
    return prompts, limits


def run_generate(model, prompts: list[list[int]], limits: list[int], batch: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        ps, ls = prompts[i:i + batch], limits[i:i + batch]
        width = max(map(len, ps))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in ps])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(ls),
                           do_sample=False, eos_token_id=None, pad_token_id=0)
    return time.perf_counter() - t0


def run_scheduler(model, prompts: list[list[int]], limits: list[int], batch: int) -> float:
    from rollout_server.engine.sampling import SamplingParams
    from rollout_server.engine.scheduler import Request, Scheduler

    sched = Scheduler(model, max_running=batch, max_total_tokens=1 << 20, context_len=512, eos_ids=frozenset([2]),
                      weight_version="0").start()
    done, finished = [0], threading.Event()

    def fin(r):
        assert len(r.output_ids) == r.params.max_new_tokens, r.finish_reason
        done[0] += 1
        if done[0] == len(prompts):
            finished.set()
    try:
        t0 = time.perf_counter()
        for i, (p, m) in enumerate(zip(prompts, limits)):
            sched.submit(Request(rid=str(i), input_ids=p, params=SamplingParams(max_new_tokens=m, temperature=0.0),
                                 stop_ids=frozenset(), on_finish=fin))
        assert finished.wait(WAIT_S)
        return time.perf_counter() - t0
    finally:
        sched.stop()


def run_http(prompts: list[list[int]], limits: list[int], batch: int) -> float:
    from rollout_server.engine import EmbeddedEngine

    engine = EmbeddedEngine(BENCH_MODEL, EngineConfig(max_running_requests=batch, max_total_tokens=1 << 20)).start()

    def one(a):
        body = json.dumps({"input_ids": a[0], "sampling_params": {"max_new_tokens": a[1], "temperature": 0,
                                                                  "ignore_eos": True}}).encode()
        req = urllib.request.Request(engine.url + "/generate", data=body, headers={"Content-Type": "application/json"})
        out = json.loads(urllib.request.urlopen(req, timeout=WAIT_S).read())
        assert len(out["output_ids"]) == a[1]
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:
            list(pool.map(one, zip(prompts, limits)))
        return time.perf_counter() - t0
    finally:
        engine.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--via", choices=("scheduler", "http"), default="scheduler")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    model = build_model(BENCH_MODEL)
    prompts, limits = workload(args.requests, args.seed)
    warm_p, warm_l = workload(4, args.seed + 1)
    run_generate(model, warm_p, [8] * 4, args.batch)
    run_scheduler(model, warm_p, [8] * 4, args.batch)
    t_gen = run_generate(model, prompts, limits, args.batch)
    t_eng = run_http(prompts, limits, args.batch) if args.via == "http" else \
        run_scheduler(model, prompts, limits, args.batch)
    tokens = sum(limits)
    figure, baseline = tokens / t_eng, tokens / t_gen
    print(json.dumps({"name": f"engine_vs_generate_{args.via}", "figure": round(figure, 1), "unit": "output tokens/s",
                      "baseline": round(baseline, 1), "ratio": round(figure / baseline, 3), "goal": 2.0,
                      "requests": args.requests, "batch": args.batch, "useful_tokens": tokens,
                      "engine_s": round(t_eng, 2), "generate_s": round(t_gen, 2),
                      "model": "qwen2 h512 L4 V4096 fp32", "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
