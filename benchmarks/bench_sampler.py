"""The engine's sampler at a real vocabulary: one decode step's sampling of a batch, the sampler of
``rollout_server/engine/sampling.py`` against the one it replaced (2026-11-27, kept below as the
baseline): exponential noise over the whole vocabulary drawn on the CPU for every sampled row and
copied to the device (``argmax(p / E)``).

    python benchmarks/bench_sampler.py [--vocab 151936] [--batch 64] [--rounds 5] [--threads 1]

One JSON line per case (benchmarks/README.md): ``figure`` the median ms per step of the new
sampler, ``baseline`` the old one's on the same logits, ``ratio`` baseline / figure. Cases: every
row sampled at temperature 1 with no truncation (the RL default, half the rows seeded), and top-p
0.9 at temperature 0.7. On CPU this measures the work; on a GPU (``--device cuda``) the old
sampler's cost is its CPU draw and the copy, the new one's a few kernels.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from rollout_server.engine.sampling import SamplingParams, prepare, sample, seeded_rng

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.transport_report import at_least  # noqa: E402


def old_sample(logits, params, generators, shared):
    """The sampler before 2026-11-27 (its noise drawn on the CPU), for the baseline only."""
    logits = logits.float()
    temps = [p.temperature or 1.0 for p in params]
    scaled = (logits if all(t == 1.0 for t in temps) else
              logits / torch.tensor(temps, dtype=torch.float32, device=logits.device)[:, None])
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        tokens[rows] = _old_rows(scaled[rows], [params[i] for i in rows],
                                 [generators[i] for i in rows], shared)
    return tokens, scaled.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(scaled, dim=-1)


def _old_rows(scaled, params, generators, shared):
    scaled = _old_truncate(scaled, params)
    probs = torch.softmax(scaled, dim=-1)
    noise = torch.empty_like(probs)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        noise[unseeded] = (torch.empty(len(unseeded), probs.shape[1])
                           .exponential_(generator=shared).to(probs.device))
    for i, g in enumerate(generators):
        if g is not None:
            noise[i] = torch.empty(probs.shape[1]).exponential_(generator=g).to(probs.device)
    return (probs / noise).argmax(dim=-1)


def _old_truncate(scaled, params):
    vocab = scaled.shape[1]
    top_k = torch.tensor([min(p.top_k, vocab) for p in params], device=scaled.device)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=scaled.device)
    if bool((top_k >= vocab).all()) and bool((top_p >= 1.0).all()):
        return scaled
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=scaled.device)[None, :]
    drop = rank >= top_k[:, None]
    sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop |= mass_before > top_p[:, None]
    drop[:, 0] = False
    mask = torch.zeros_like(drop).scatter(1, order, drop)
    return scaled.masked_fill(mask, float("-inf"))


def timed(fn, rounds: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens, _ = fn()
        tokens.tolist()  # the step reads its tokens either way
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=at_least(2), default=151936)
    ap.add_argument("--batch", type=at_least(1), default=64)
    ap.add_argument("--rounds", type=at_least(1), default=5)
    ap.add_argument("--threads", type=at_least(1), default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    logits = (torch.randn(args.batch, args.vocab, generator=torch.Generator().manual_seed(0))
              * 4).to(device, torch.bfloat16)
    cases = {"t1_full_vocab": dict(temperature=1.0), "t0.7_top_p0.9": dict(temperature=0.7,
                                                                         top_p=0.9)}
    for case, kw in cases.items():
        # half the rows seeded, as an RL job's requests may be
        params = [SamplingParams(**kw, sampling_seed=i if i % 2 else None)
                  for i in range(args.batch)]
        gens = [None if p.sampling_seed is None else torch.Generator().manual_seed(p.sampling_seed)
                for p in params]
        shared, rngs = torch.Generator().manual_seed(0), [
            random.Random(0) if p.sampling_seed is None else seeded_rng(p.sampling_seed)
            for p in params]
        new_ms = timed(lambda: sample(logits, prepare(params, [r.random() for r in rngs],
                                                      device)), args.rounds, device)
        old_ms = timed(lambda: old_sample(logits, params, gens, shared), args.rounds, device)
        print(json.dumps({"name": f"sampler_{case}", "figure": round(new_ms, 2), "unit": "ms",
                          "baseline": round(old_ms, 2), "ratio": round(old_ms / new_ms, 2),
                          "goal": None, "vocab": args.vocab, "batch": args.batch,
                          "threads": args.threads, "device": str(device),
                          "torch": torch.__version__}))


if __name__ == "__main__":
    main()
