"""Trainer memory: measured peak of one real training step vs ``launch.memory``'s estimate.

One process, the trainer's own code path (world-size-1 gloo group, CPU, ``--dtype``: fp32 (not
sharded) or bf16 (FSDP2 on a one-rank mesh with the mixed-precision policy)): the policy is
built (``trainer.model.build_policy``: meta device, sharded, materialised) and ``--steps``
``trainer.step.train_step`` calls run on a batch of ``--seqs`` sequences of ``--len`` tokens,
``--mbs`` sequences per micro-batch (gradients accumulate over the micro-batches, as in a real step;
from the second step on the AdamW moments exist during the forward/backward). Measured: the peak of
the bytes held by tensors allocated from the start of the build
to the end of the step (``benchmarks.memory.PeakTensorBytes``: parameters, gradients, AdamW states,
all-gathered parameters, activations, log-prob chunks), and the process's peak RSS for reference
(which adds torch/transformers themselves and allocator slack). The estimate is the accounting that
``trainer/MEMORY.md``'s tables are computed with, for the same shape, tokens and settings
(``estimate_lora_peak_bytes`` with ``--lora-rank``: adapters on the trainer's default targets over
a frozen fp32 base, as the trainer builds them).

Default shape: Qwen2-0.5B's hidden size, MLP, heads and full 151936-token vocabulary, cut to
``--layers 4`` so that the whole step (~5 GB) fits a shared CPU machine. The loss kernel is plain
PPO with the behaviour log-probs as the proximal ones (no recompute pass), so the step is one
forward/backward and one optimizer step.

    .venv/bin/python benchmarks/bench_trainer_memory.py                       # ~5 GB, a few minutes
    .venv/bin/python benchmarks/bench_trainer_memory.py --layers 2 --len 256 --checkpointing
    .venv/bin/python benchmarks/bench_trainer_memory.py --lora-rank 8     # adapters, frozen base

Prints one JSON line: figure = measured GiB, baseline = estimated GiB, ratio = the smaller of
measured / estimate and estimate / measured (1 when they agree; goal >= 0.87: each within 1.15x
the other), ``measured_over_estimate`` (above 1: the estimate is low), plus each term of the
estimate and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.transport_report import at_least  # noqa: E402

GOAL = round(1 / 1.15, 2)  # ratio: the estimate and the measurement within 1.15x of each other


def synthetic_batch(seqs: int, length: int, prompt: int = 32):
    import numpy as np

    from areal_like.wire.protocol import TrajectoryGroup
    from areal_like.wire.trajectory import Trajectory
    from trainer.data import groups_to_batch

    rng = np.random.default_rng(0)
    trajs = [Trajectory.of(prompt_ids=rng.integers(4, 100, prompt),
                           output_ids=rng.integers(4, 100, length - prompt),
                           behav_logp=-rng.random(length - prompt) * 3,
                           versions=np.zeros(length - prompt, np.int32),
                           reward=float(i % 2), finish_reason="stop") for i in range(seqs)]
    return groups_to_batch([TrajectoryGroup(group_id="g0", server_id="s", lease_id="0",
                                            prompt_index=0, epoch=0,
                                            trajectories=trajs)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="0.5B", choices=("0.5B", "1.5B", "3B", "7B"))
    p.add_argument("--layers", type=at_least(1), default=4,
                   help="decoder blocks (the shape's own count: 0)")
    p.add_argument("--vocab", type=at_least(0), default=0,
                   help="vocabulary (the shape's own: 0); smaller makes the "
                        "activations, not the embeddings, the peak")
    p.add_argument("--seqs", type=at_least(1), default=2)
    p.add_argument("--mbs", type=at_least(1), default=1,
                   help="trainer.micro_batch_size (sequences)")
    p.add_argument("--len", type=at_least(1), default=512,
                   help="tokens per sequence (32 prompt + the rest output)")
    p.add_argument("--steps", type=at_least(1), default=2)
    p.add_argument("--chunk", type=at_least(1), default=512, help="trainer.logprob_chunk_tokens")
    p.add_argument("--checkpointing", action="store_true",
                   help="trainer.activation_checkpointing=true")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="model.dtype")
    p.add_argument("--lora-rank", type=at_least(0), default=0,
                   help="trainer.lora.rank (0: off) on the default target_modules (fp32 base)")
    args = p.parse_args()

    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    from areal_like.settings.config import load_config
    from benchmarks.memory import PeakTensorBytes
    from launch.memory import GIB, estimate_lora_peak_bytes, estimate_peak_bytes, qwen2_shape
    from trainer.model import build_policy, init_distributed, leave_distributed
    from trainer.step import StepSettings, train_step

    model_cfg = qwen2_shape(args.shape,
                            **({"num_hidden_layers": args.layers} if args.layers else {}),
                            **({"vocab_size": args.vocab} if args.vocab else {}))
    overrides = [f"model.{k}={v}" for k, v in vars(model_cfg).items() if k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads", "tie_word_embeddings")]
    cfg = load_config([*overrides, "model.max_position_embeddings=4096",
                       f"model.dtype={args.dtype}",
                       "trainer.loss.kernel=ppo", "trainer.skip_zero_advantage=false",
                       "trainer.loss.agg=token-mean", f"trainer.micro_batch_size={args.mbs}",
                       f"trainer.logprob_chunk_tokens={args.chunk}",
                       f"trainer.activation_checkpointing={str(args.checkpointing).lower()}",
                       f"trainer.lora.rank={args.lora_rank}"])
    batch = synthetic_batch(args.seqs, args.len)
    init_distributed(cfg.trainer)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.monotonic()
    with PeakTensorBytes() as m:
        policy = build_policy(cfg.model, cfg.trainer)
        s = StepSettings.from_config(cfg)
        for _ in range(args.steps):
            stats = train_step(policy, batch, s, batch.behav_logp)
    wall = time.monotonic() - t0
    many = args.seqs > args.mbs
    if args.lora_rank:
        est = estimate_lora_peak_bytes(cfg.model, 1, args.mbs * args.len, args.lora_rank,
                                       cfg.trainer.lora.target_modules, args.dtype, None,
                                       args.checkpointing, args.chunk, many)
    else:
        est = estimate_peak_bytes(cfg.model, 1, args.mbs * args.len, args.dtype, args.checkpointing,
                                  args.chunk, accumulating=many)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        **memory_line(m.peak, est.total),
        "shape": args.shape, "layers": cfg.model.num_hidden_layers, "vocab": cfg.model.vocab_size,
        "micro_batch_tokens": args.mbs * args.len,
        "micro_batches": -(-args.seqs // args.mbs), "steps": args.steps,
        "chunk": args.chunk, "checkpointing": args.checkpointing, "dtype": args.dtype, "world": 1,
        "lora_rank": args.lora_rank,
        "terms_gib": {k: round(v / GIB, 3) for k, v in vars(est).items() if k != "accumulating"},
        "moments_gib": {k: round(v / GIB, 3) for k, v in est.moments.items()},
        "rss_peak_gib": round(rss / GIB, 3), "rss_before_gib": round(rss0 / GIB, 3),
        "loss": stats["loss"], "wall_s": round(wall, 1)}))
    leave_distributed()


def memory_line(measured: int, estimate: int) -> dict:
    """The line's common keys from the measured and the estimated peak bytes."""
    from launch.memory import GIB

    return {"name": "trainer_memory", "figure": round(measured / GIB, 3),
            "unit": "GiB (measured tensor peak)", "baseline": round(estimate / GIB, 3),
            "ratio": round(min(measured / estimate, estimate / measured), 3), "goal": GOAL,
            "measured_over_estimate": round(measured / estimate, 3)}


if __name__ == "__main__":
    main()
