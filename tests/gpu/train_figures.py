"""The trainer's GPU kit figures, each phase in this one process, one ``RESULT {json}`` line each
(``tests/gpu/test_train_throughput.py`` runs it and records the figures).

Phases (``--phases``; by default all, in the order of ``PHASES``: the compiled one last, as
the slowest to start):

* ``packed_0.5B``: ``trainer.step.train_step`` on one rank, bf16 (FSDP2's mixed precision), on a
  batch of ``--seqs`` sequences with log-normal lengths as ``benchmarks/bench_packing.py`` makes
  them (median 300, sigma 0.8, clipped to [32, ``--max-len``]), packed in micro-batches of at most
  ``--budget`` tokens; the second of two steps is timed;
* ``plain_0.5B``: the baseline, a plain PyTorch + Hugging Face step on the same batch: the
  transformers model with SDPA, fp32 weights under ``torch.autocast`` bf16, micro-batches of
  ``--plain-mbs`` sequences in batch order right-padded, ``model(..., labels=...).loss`` (full
  logits), ``backward``, torch's default AdamW; timed the same way;
* ``packed_1.5B``: the trainer's step at Qwen2-1.5B's shape on the same batch;
* ``compiled_0.5B``: ``packed_0.5B`` with ``trainer.compile_blocks=true`` (inductor; three
  steps, the last timed, so that the recompile for a new packed length is behind it);
* ``lora_7B``: a LoRA step (rank 8, default targets, bf16 compute, activation checkpointing) at
  Qwen2-7B's shape on 8 sequences of 2048 tokens in micro-batches of 4096 tokens: the row of
  trainer/MEMORY.md's "LoRA on one GPU beside SGLang" table (36.7 GiB estimated).

Each phase reports its tokens (real ones: padding not counted), seconds, model FLOPs (the MFU
convention of ``kit.train_flops``: the output head on output tokens only) and peak memory
(``torch.cuda.max_memory_allocated`` since the phase began), or its error. On CPU
(``--device cpu --tiny``: the default tiny model in fp32, a few short sequences) every phase but
the compiled one runs end to end in seconds, which tests/unit/test_gpu_kit_trainer.py checks.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # kit.py

PHASES = ("packed_0.5B", "plain_0.5B", "packed_1.5B", "lora_7B", "compiled_0.5B")
LORA_SEQS, LORA_LEN, LORA_BUDGET, LORA_RANK = 8, 2048, 4096, 8


def lognormal_batch(seqs: int, max_len: int, seed: int = 0):
    """``benchmarks/bench_packing.py``'s long-tailed batch (median 300, sigma 0.8, groups of 8)."""
    from benchmarks.bench_packing import long_tailed_batch

    batch, _ = long_tailed_batch(seqs, 300, 0.8, max_len, 8, seed)
    return batch


def equal_batch(seqs: int, seq_len: int, prompt: int = 64):
    import numpy as np

    from areal_like.wire.protocol import TrajectoryGroup
    from areal_like.wire.trajectory import Trajectory
    from trainer.data import groups_to_batch

    rng = np.random.default_rng(0)
    new = seq_len - prompt
    trajs = [Trajectory.of(prompt_ids=rng.integers(4, 100, prompt),
                           output_ids=rng.integers(4, 100, new), behav_logp=-rng.random(new) * 5,
                           versions=np.zeros(new, np.int32), reward=float(i % 2),
                           finish_reason="length") for i in range(seqs)]
    return groups_to_batch([TrajectoryGroup(group_id="g", server_id="s", lease_id="0",
                                            prompt_index=0, epoch=0, trajectories=trajs)])


def seq_lens(batch) -> list[int]:
    return (batch.prompt_lens + batch.output_lens).tolist()


def model_flops(cfg, batch) -> float:
    """Training FLOPs of one pass over ``batch``: ``kit.train_flops`` (the output head on the
    output tokens only; its docstring states the attention convention)."""
    from kit import train_flops

    from launch.memory import block_params

    seqs = list(zip(batch.prompt_lens.tolist(), batch.output_lens.tolist()))
    return train_flops(cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, block_params(cfg),
                       seqs)


# what each test of tests/gpu/test_train_throughput.py reads (the compiled phase runs apart)
NEEDS = {
    "test_packed_step_against_the_plain_hf_step": ("packed_0.5B", "plain_0.5B"),
    "test_the_1_5b_step": ("packed_1.5B",),
    "test_the_7b_lora_step_peak_memory_against_the_estimate": ("lora_7B",),
    "test_the_compiled_step": ("packed_0.5B",),
}


def phases_for(tests: list[str]) -> list[str]:
    """The phases (in ``PHASES`` order, the compiled one left out) that the selected tests of
    test_train_throughput.py read: ``-k packed`` runs no 1.5B or 7B phase. A test name may carry
    pytest's parameter suffix; an unknown name needs nothing."""
    wanted = {p for t in tests for p in NEEDS.get(t.split("[")[0], ())}
    return [p for p in PHASES if p in wanted and not p.startswith("compiled")]


class Device:
    """Synchronise, time and measure peak memory on CUDA; on CPU only time."""

    def __init__(self, name: str):
        import torch

        self.torch, self.cuda = torch, name.startswith("cuda")

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self):
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int | None:
        return self.torch.cuda.max_memory_allocated() if self.cuda else None

    def timed(self, fn, steps: int = 2) -> float:
        """Seconds of the last of ``steps`` calls (the first warms kernels and the allocator)."""
        for _ in range(steps):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            seconds = time.perf_counter() - t0
        return seconds


def profile_step(step, dev: Device, path: Path, title: str) -> None:
    """One more call of ``step`` under torch.profiler (after the timed ones: the figures are not
    the profiler's), its table by CUDA and CPU time written to ``path``."""
    import torch
    from kit import profile_text

    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev.cuda:
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        step()
        dev.sync()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile_text(title, prof))


def trainer_phase(model_cfg, batch, dev: Device, overrides: list[str], steps: int = 2,
                  profile: Path | None = None) -> dict:
    """The trainer's own step (``build_policy`` + ``train_step``) on ``batch``; with ``profile``,
    one more step profiled into that file."""
    from areal_like.settings.config import load_config
    from trainer.model import build_policy, init_distributed
    from trainer.step import StepSettings, recompute_prox_logp, train_step

    cfg = load_config([f"trainer.device={'cuda' if dev.cuda else 'cpu'}", *overrides])
    cfg = replace(cfg, model=model_cfg)
    init_distributed(cfg.trainer)
    dev.reset_peak()
    policy = build_policy(cfg.model, cfg.trainer)
    s = StepSettings.from_config(cfg)
    out = {}

    def step():
        out["stats"] = train_step(policy, batch, s, recompute_prox_logp(policy, batch, s))

    seconds = dev.timed(step, steps)
    result = {"seconds": seconds, "peak_bytes": dev.peak(), "loss": out["stats"]["loss"],
              "micro_batches": out["stats"].get("micro_batches")}
    if profile is not None:
        profile_step(step, dev, profile, f"one packed trainer step ({len(seq_lens(batch))} "
                                         f"sequences, {sum(seq_lens(batch))} tokens)")
        result["profile"] = str(profile)
    return result  # the model and its optimizer go with this frame (reset_peak collects them)


def plain_phase(model_cfg, batch, dev: Device, mbs: int) -> dict:
    """The baseline step: transformers' model and loss, SDPA, padded micro-batches."""
    import torch

    from areal_like.weights.hf import build_model

    dev.reset_peak()
    device = "cuda" if dev.cuda else "cpu"
    model = build_model(replace(model_cfg, attn_implementation="sdpa"), device=device,
                        dtype="float32").train()
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    lens = seq_lens(batch)
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=model_cfg.dtype == "bfloat16")

    def step():
        for lo in range(0, len(lens), mbs):
            rows = list(range(lo, min(lo + mbs, len(lens))))
            width = max(lens[r] for r in rows)
            ids = batch.input_ids[rows, :width].to(device)
            keep = torch.arange(width)[None] < torch.tensor([lens[r] for r in rows])[:, None]
            keep = keep.to(device)
            labels = ids.masked_fill(~keep, -100)
            with amp:
                loss = model(input_ids=ids, attention_mask=keep.long(), labels=labels).loss
            (loss * len(rows) / len(lens)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = dev.timed(step)
    result = {"seconds": seconds, "peak_bytes": dev.peak()}
    return result


def run_phase(name: str, args, dev: Device) -> dict:
    from areal_like.settings.config import load_config
    from launch.memory import qwen2_shape

    dtype = "float32" if args.tiny else "bfloat16"

    def shape(size: str):
        if args.tiny:
            return replace(load_config([]).model, dtype=dtype)
        return qwen2_shape(size, dtype=dtype)

    budget = [f"trainer.max_tokens_per_micro_batch={args.budget}", "trainer.pack_min_padding=0"]
    if name == "lora_7B":
        seqs, seq_len = (2, 64) if args.tiny else (LORA_SEQS, LORA_LEN)
        batch, model_cfg = equal_batch(seqs, seq_len, prompt=16 if args.tiny else 64), shape("7B")
        res = trainer_phase(model_cfg, batch, dev, [
            f"trainer.lora.rank={LORA_RANK}", "trainer.activation_checkpointing=true",
            f"trainer.max_tokens_per_micro_batch={LORA_BUDGET}"])
    else:
        batch = lognormal_batch(args.seqs, args.max_len)
        model_cfg = shape(name.split("_")[1])
        if name.startswith("plain"):
            res = plain_phase(model_cfg, batch, dev, args.plain_mbs)
        elif name.startswith("compiled"):
            res = trainer_phase(model_cfg, batch, dev, [*budget, "trainer.compile_blocks=true"],
                                steps=3)
        else:
            profile = (Path(args.profile_dir) / f"profile_train_{name}.txt"
                       if args.profile_dir and name == "packed_0.5B" else None)
            res = trainer_phase(model_cfg, batch, dev, budget, profile=profile)
    lens = seq_lens(batch)
    return {"phase": name, "tokens": sum(lens), "longest": max(lens), "seqs": len(lens),
            "flops": model_flops(model_cfg, batch), **res}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phases", default=",".join(PHASES),
                    help=f"comma-separated, of {', '.join(PHASES)}")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true",
                    help="the default tiny model in fp32 (a CPU check of every phase)")
    ap.add_argument("--seqs", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--budget", type=int, default=16384, help="tokens per packed micro-batch")
    ap.add_argument("--plain-mbs", type=int, default=8, help="sequences per padded micro-batch")
    ap.add_argument("--profile-dir", default="",
                    help="profile one more packed_0.5B step into DIR/profile_train_packed_0.5B.txt")
    args = ap.parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    if unknown := [p for p in phases if p not in PHASES]:
        ap.error(f"--phases: unknown {', '.join(unknown)} (known: {', '.join(PHASES)})")
    for flag in ("seqs", "max_len", "budget", "plain_mbs"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    dev = Device(args.device)
    try:
        for name in phases:
            try:
                res = run_phase(name, args, dev)
            except Exception as e:  # one phase's failure (an OOM) leaves the others' figures
                traceback.print_exc()
                res = {"phase": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            print("RESULT " + json.dumps(res), flush=True)
    finally:
        from trainer.model import leave_distributed

        leave_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
