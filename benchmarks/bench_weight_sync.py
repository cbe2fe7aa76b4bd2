"""Weight broadcast: the trainer's bucketed per-tensor broadcast against one flat tensor, same run.

Three processes on loopback form one gloo weight group exactly as in a real sync
(``areal_like.distributed.init_weight_group``): rank 0 is the trainer, ranks 1-2 are receivers.

* bucketed: the tensors of a Qwen2-shaped model (default hidden 512, 4 layers, vocab 8192:
  ~24M fp32 parameters, ~96 MB) in the order and buckets of ``trainer.weight_sync.plan_buckets``;
  the sender issues every tensor of a bucket as an async broadcast and waits for them (what
  ``WeightBroadcaster`` does). Two receiver strategies, one JSON line each:
  ``in_place``: receive straight into the parameters (safe: generation is paused during a sync);
  ``alloc_copy``: allocate a fresh buffer per tensor, receive, copy into the parameters (what the
  embedded engine's loader does today, like SGLang's).
* flat: the same number of bytes as one flat fp32 tensor, received into one buffer, no load:
  the transport's ceiling, measured in the same run, interleaved with the bucketed trials.

Each line: bucketed GB/s (figure), flat GB/s (baseline), ratio = bucketed/flat (goal >= 0.85),
and the pause window: the slowest receiver's time from the start of the sync to the last tensor
loaded, against the pure flat transfer time (goal pause <= 1.2x transfer). Median of ``--trials``
trials after one warm-up. Not included: the trainer-side FSDP all-gather (``full_tensor``).

    .venv/bin/python benchmarks/bench_weight_sync.py                      # ~96 MB, < 60 s
    .venv/bin/python benchmarks/bench_weight_sync.py --hidden 1024 --layers 8 --bucket-mb 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GROUP_TIMEOUT_S = 120.0  # rendezvous and every op; the whole benchmark must fit in well under it


def model_shapes(hidden: int, layers: int, vocab: int) -> list[tuple[str, list[int], str]]:
    """Parameter names and shapes of a Qwen2 (heads of 64, kv heads = half, ffn = 4x), in HF order."""
    kv = hidden // 2
    out = [("model.embed_tokens.weight", [vocab, hidden], "float32")]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", [hidden, hidden], "float32"), (p + "self_attn.q_proj.bias", [hidden], "float32"),
                (p + "self_attn.k_proj.weight", [kv, hidden], "float32"), (p + "self_attn.k_proj.bias", [kv], "float32"),
                (p + "self_attn.v_proj.weight", [kv, hidden], "float32"), (p + "self_attn.v_proj.bias", [kv], "float32"),
                (p + "self_attn.o_proj.weight", [hidden, hidden], "float32"),
                (p + "mlp.gate_proj.weight", [4 * hidden, hidden], "float32"),
                (p + "mlp.up_proj.weight", [4 * hidden, hidden], "float32"),
                (p + "mlp.down_proj.weight", [hidden, 4 * hidden], "float32"),
                (p + "input_layernorm.weight", [hidden], "float32"),
                (p + "post_attention_layernorm.weight", [hidden], "float32")]
    return out + [("model.norm.weight", [hidden], "float32"), ("lm_head.weight", [vocab, hidden], "float32")]


def worker(rank: int, port: int, args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO))
    from areal_like.distributed import init_weight_group
    from trainer.weight_sync import plan_buckets

    pg = init_weight_group("gloo", "127.0.0.1", port, 3, rank, "bench_weights", GROUP_TIMEOUT_S)
    shapes = model_shapes(args.hidden, args.layers, args.vocab)
    buckets = plan_buckets(shapes, int(args.bucket_mb * 1024 * 1024))
    gen = torch.Generator().manual_seed(rank)
    params = {n: torch.randn(s, generator=gen) for n, s, _ in shapes}  # sender: the weights; receivers: the model
    n_elems = sum(t.numel() for t in params.values())
    flat = torch.randn(n_elems) if rank == 0 else torch.empty(n_elems)

    def bucketed(in_place: bool) -> float:
        t0 = time.perf_counter()
        for b in buckets:
            if rank == 0 or in_place:
                works = [dist.broadcast(params[n], group_src=0, group=pg, async_op=True) for n in b.names]
                for w in works:
                    w.wait()
            else:
                bufs = [torch.empty(s) for s in b.shapes]
                for buf in bufs:
                    dist.broadcast(buf, group_src=0, group=pg)
                with torch.no_grad():
                    for n, buf in zip(b.names, bufs):
                        params[n].copy_(buf)
        return time.perf_counter() - t0

    def flat_once() -> float:
        t0 = time.perf_counter()
        dist.broadcast(flat, group_src=0, group=pg)
        return time.perf_counter() - t0

    cases = {"flat": flat_once, "in_place": lambda: bucketed(True), "alloc_copy": lambda: bucketed(False)}
    results = {name: [] for name in cases}
    for trial in range(args.trials + 1):
        for name, fn in cases.items():
            dist.barrier(group=pg)
            dt = torch.tensor([fn()], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX, group=pg)  # the slowest rank: when the last receiver is done
            if trial > 0:
                results[name].append(float(dt))
    for mode in ("in_place", "alloc_copy"):
        if rank != 0:
            break
        nbytes = 4 * n_elems
        t_b, t_f = statistics.median(results[mode]), statistics.median(results["flat"])
        gbps_b, gbps_f = nbytes / t_b / 1e9, nbytes / t_f / 1e9
        print(json.dumps({
            "name": f"weight_sync_bucketed_{mode}_vs_flat", "figure": round(gbps_b, 3), "unit": "GB/s",
            "baseline": round(gbps_f, 3), "ratio": round(gbps_b / gbps_f, 3), "goal": ">= 0.85",
            "pause_s": round(t_b, 4), "transfer_s": round(t_f, 4), "pause_over_transfer": round(t_b / t_f, 3),
            "pause_goal": "<= 1.2", "ratio_best_trials": round(min(results["flat"]) / min(results[mode]), 3),
            "bytes": nbytes, "tensors": len(shapes), "buckets": len(buckets),
            "bucket_mb": args.bucket_mb, "receivers": 2, "trials": args.trials, "backend": "gloo",
        }), flush=True)
    dist.destroy_process_group(pg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--trials", type=int, default=15)
    ap.add_argument("--rank", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank >= 0:
        worker(args.rank, args.port, args)
        return
    sys.path.insert(0, str(REPO))
    from areal_like.distributed import free_port

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--rank", str(r), "--port", str(port)],
                              env=env) for r in range(3)]
    try:
        codes = [p.wait(timeout=GROUP_TIMEOUT_S * 2) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    sys.exit(max(codes))


if __name__ == "__main__":
    main()
