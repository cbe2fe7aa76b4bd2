"""Embedded engine throughput vs transformers ``generate`` with static batches (same model, same prompts).

Workload (``workload()``): ``--requests`` prompts of U[16, 64] tokens; per-request
``max_new_tokens`` ~ U[8, 256] (case ``uniform``) or a long tail, 8 + Exp(mean 48) capped at 256
(case ``longtail``); EOS disabled (``ignore_eos``), so both sides produce exactly the same useful
tokens: the sum of the per-request limits. The model is a Qwen2 built from a config (``--hidden``
512 by default, 4 layers, vocab 4096, fp32), big enough that a forward pass is not pure Python
overhead.

- engine: all requests submitted at once to the scheduler (``--via scheduler``, default: its
  thread-safe Python API, no HTTP) or POSTed concurrently to ``/generate`` (``--via http``), with
  ``max_running_requests = --batch``; requests join and leave the batch every step.
- baseline: ``model.generate`` on left-padded static batches of ``--batch`` prompts (greedy,
  sampling off, KV cache on); a batch runs until its longest request is done, and only each
  row's own ``max_new_tokens`` count as useful tokens.

Prints one JSON line per case: ``figure`` = engine output tokens per CPU-second of this process,
``baseline`` = the same for generate, ``ratio``; wall-clock tokens/s are included (``wall_*``) but on
a shared machine they mostly measure the neighbours. Both sides are single-threaded
(OMP_NUM_THREADS=1). Run: ``.venv/bin/python benchmarks/bench_engine.py`` (about a minute on 2
busy cores).

What bounds the ratio: static batches pay ``E[max of the batch's lengths]`` steps per batch, the
engine about ``E[length]`` steps per slot. When a step costs about the same for 1 or 16 rows
(small models: overhead and weight reads dominate) the gain tends to that ratio of steps, 1.83
for U[8, 256] and about 3 for the long tail; when a step's cost grows with its rows (bigger
models) the gain is the ratio of padded to useful row-steps, about 2.45 for U[8, 256].
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

VOCAB = 4096


def bench_model(hidden: int = 512) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
WAIT_S = 900.0


def workload(n: int, seed: int, lengths: str = "uniform") -> tuple[list[list[int]], list[int]]:
    """Prompts of U[16, 64] tokens; max_new_tokens ~ U[8, 256] (uniform) or 8 + Exp(mean 48) capped at
    256 (longtail: most responses short, a few hit the cap, as RL rollouts look)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(4, VOCAB, (int(k),), generator=g).tolist()
               for k in torch.randint(16, 65, (n,), generator=g)]
    if lengths == "uniform":
        limits = torch.randint(8, 257, (n,), generator=g).tolist()
    else:
        limits = (8 + torch.empty(n).exponential_(1 / 48, generator=g)).clamp(max=256).long().tolist()
    return prompts, limits


class Clock:
    """Wall time and this process's CPU time (all threads) of one run."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def run_generate(model, prompts: list[list[int]], limits: list[int], batch: int) -> None:
    for i in range(0, len(prompts), batch):
        ps, ls = prompts[i:i + batch], limits[i:i + batch]
        width = max(map(len, ps))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in ps])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(ls),
                           do_sample=False, eos_token_id=None, pad_token_id=0)


def run_scheduler(model, prompts: list[list[int]], limits: list[int], batch: int) -> None:
    from rollout_server.engine.sampling import SamplingParams
    from rollout_server.engine.scheduler import Request, Scheduler

    sched = Scheduler(model, max_running=batch, max_total_tokens=1 << 20, context_len=512,
                      weight_version="0").start()
    done, finished = [0], threading.Event()

    def fin(r):
        assert len(r.output_ids) == r.params.max_new_tokens, r.finish_reason
        done[0] += 1
        if done[0] == len(prompts):
            finished.set()
    try:
        for i, (p, m) in enumerate(zip(prompts, limits)):
            sched.submit(Request(rid=str(i), input_ids=p, params=SamplingParams(max_new_tokens=m, temperature=0.0),
                                 stop_ids=frozenset(), on_finish=fin))
        assert finished.wait(WAIT_S)
    finally:
        sched.stop()


def start_http_engine(model_cfg: ModelConfig, batch: int):
    from rollout_server.engine import EmbeddedEngine

    return EmbeddedEngine(model_cfg, EngineConfig(max_running_requests=batch, max_total_tokens=1 << 20)).start()


def run_http(engine, prompts: list[list[int]], limits: list[int]) -> None:

    def one(a):
        body = json.dumps({"input_ids": a[0], "sampling_params": {"max_new_tokens": a[1], "temperature": 0,
                                                                  "ignore_eos": True}}).encode()
        req = urllib.request.Request(engine.url + "/generate", data=body, headers={"Content-Type": "application/json"})
        out = json.loads(urllib.request.urlopen(req, timeout=WAIT_S).read())
        assert len(out["output_ids"]) == a[1]
    with ThreadPoolExecutor(len(prompts)) as pool:
        list(pool.map(one, zip(prompts, limits)))


def measure(model, engine, lengths: str, args) -> dict:
    prompts, limits = workload(args.requests, args.seed, lengths)

    def run_engine(ps, ls):
        return run_http(engine, ps, ls) if engine else run_scheduler(model, ps, ls, args.batch)
    with Clock() as gen:
        run_generate(model, prompts, limits, args.batch)
    with Clock() as eng:
        run_engine(prompts, limits)
    tokens = sum(limits)
    # CPU seconds are the primary measure: on a shared machine wall time mostly measures the neighbours.
    figure, baseline = tokens / eng.cpu, tokens / gen.cpu
    return {"name": f"engine_vs_generate_{args.via}_{lengths}", "figure": round(figure, 1),
            "unit": "output tokens per CPU-second", "baseline": round(baseline, 1),
            "ratio": round(figure / baseline, 3), "goal": 2.0,
            "wall_tokens_per_s": round(tokens / eng.wall, 1), "wall_baseline": round(tokens / gen.wall, 1),
            "wall_ratio": round(gen.wall / eng.wall, 3), "requests": args.requests, "batch": args.batch,
            "useful_tokens": tokens, "model": f"qwen2 h{args.hidden} L4 V4096 fp32",
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--via", choices=("scheduler", "http"), default="scheduler")
    ap.add_argument("--lengths", choices=("uniform", "longtail", "both"), default="both")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=512, help="hidden size of the 4-layer benchmark Qwen2")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    model_cfg = bench_model(args.hidden)
    model = build_model(model_cfg)
    engine = start_http_engine(model_cfg, args.batch) if args.via == "http" else None
    try:
        warm_p, _ = workload(4, args.seed + 1)
        run_generate(model, warm_p, [8] * 4, args.batch)
        run_http(engine, warm_p, [8] * 4) if engine else run_scheduler(model, warm_p, [8] * 4, args.batch)
        for lengths in (("uniform", "longtail") if args.lengths == "both" else (args.lengths,)):
            print(json.dumps(measure(model, engine, lengths, args)), flush=True)
    finally:
        if engine:
            engine.stop()


if __name__ == "__main__":
    main()
