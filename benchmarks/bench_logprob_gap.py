"""The log-prob gap between an embedded engine and the trainer at one ``model.dtype``: what the
log-prob guard (``trainer/logprob_guard.py``) measures before the first batch, over many probes.

    python benchmarks/bench_logprob_gap.py [--dtype bfloat16] [--shape tiny|small|0.5b]
        [--probes 32] [--device cpu|cuda]

The trainer: ``build_policy`` (FSDP2, one rank, fp32 master weights computing in ``--dtype``); the
engine: the embedded engine's scheduler (``rollout_server/engine``) on a model of that dtype holding
the trainer's weights cast to it (what the first push sends). Each probe is the guard's: 16 new
tokens at ``--temperature`` from a random prompt (the guard's own prompt plus a random tail, so the
probes differ), scored by ``trainer_logprobs``. One JSON line: ``figure`` the largest per-probe
mean |engine - trainer| per token (what the guard compares with its tolerance), ``baseline`` the
guard's default tolerance for the dtype (``logprob_guard.default_tol``), ``ratio`` baseline /
figure (the margin; >= 1 passes), plus the median and the largest single-token difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
from pathlib import Path

import torch

from areal_like.settings.config import load_config
from areal_like.weights.hf import build_model
from rollout_server.engine.sampling import SamplingParams
from rollout_server.engine.scheduler import Request, Scheduler
from trainer.logprob_guard import PROBE_TOKENS, compare_logprobs, default_tol, trainer_logprobs
from trainer.model import build_policy, init_distributed
from trainer.ranks import full

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.transport_report import at_least  # noqa: E402

SHAPES = {"tiny": {}, "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                                     num_attention_heads=8, num_key_value_heads=2),
          # Qwen2.5-0.5B's shape (tests/gpu/test_throughput.py), random weights
          "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       tie_word_embeddings=True)}


def engine_probes(model, prompts: list[list[int]], temperature: float) -> list[Request]:
    s = Scheduler(model, max_running=len(prompts), max_total_tokens=1 << 16,
                  context_len=model.config.max_position_embeddings, weight_version="0").start()
    done, finished = threading.Event(), []

    def fin(r):
        finished.append(r)
        if len(finished) == len(prompts):
            done.set()
    try:
        for i, p in enumerate(prompts):
            s.submit(Request(rid=str(i), input_ids=p, stop_ids=frozenset(), on_finish=fin,
                             params=SamplingParams(max_new_tokens=PROBE_TOKENS,
                                                   temperature=temperature, ignore_eos=True,
                                                   sampling_seed=i)))
        if not done.wait(600):
            raise RuntimeError("the engine did not finish the probes")
    finally:
        s.stop()
    return sorted(finished, key=lambda r: int(r.rid))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--probes", type=at_least(1), default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config([f"trainer.device={args.device}", f"model.dtype={args.dtype}",
                       f"model.init_seed={args.seed}",
                       *[f"model.{k}={v}" for k, v in SHAPES[args.shape].items()]])
    init_distributed(cfg.trainer)
    policy = build_policy(cfg.model, cfg.trainer)
    state = {n: full(p).detach() for n, p in policy.model.named_parameters()}
    engine_model = build_model(cfg.model, device=args.device)
    with torch.no_grad():
        for name, t in engine_model.named_parameters():
            t.copy_(state[name].to(t.dtype))
    g = torch.Generator().manual_seed(args.seed)
    prompts = [[1] + torch.randint(4, 100, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 24, (args.probes,), generator=g)]
    means, worst = [], 0.0
    for r in engine_probes(engine_model, prompts, args.temperature):
        mine = trainer_logprobs(policy.model, r.input_ids, r.output_ids, args.temperature,
                                policy.device)
        mean, top = compare_logprobs(r.output_logprobs, mine)
        means.append(mean)
        worst = max(worst, top)
    tol = default_tol(args.dtype)
    print(json.dumps({"name": f"logprob_gap_{args.dtype}_{args.shape}",
                      "figure": round(max(means), 5), "unit": "nats/token",
                      "baseline": tol, "ratio": round(tol / max(max(means), 1e-12), 2),
                      "goal": 1.0, "median": round(statistics.median(means), 5),
                      "max_token": round(worst, 4), "probes": args.probes,
                      "temperature": args.temperature, "device": args.device,
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
