"""Expert parallelism's trainer step against FSDP2 alone, on two gloo ranks (CPU).

Workload: bench_moe.py's mixture (Qwen3-MoE, hidden 128, 2 layers, 8 experts of intermediate 64,
top 2) and bench_train_step.py's batch (8 groups x 8 samples), decoupled PPO, one optimizer step.
Both ranks build the model twice, ``trainer.expert_parallel=2`` (each rank holds 4 experts per
layer; tokens travel to them) and 1 (FSDP2 alone: every expert all-gathered in every pass), and
time them alternately over ``--trials`` steps after ``--warmup``. Rank 0 prints two JSON lines:

* ``moe_ep2_step``: figure = EP=2's trained tokens/s (median step), baseline = FSDP2 alone's,
  ratio = figure / baseline (goal >= 1: sending tokens costs no more than gathering experts);
* ``moe_ep2_all_gather_bytes``: figure = the bytes FSDP2 all-gathers per step and rank under EP=2,
  baseline = FSDP2 alone's, ratio = baseline / figure (goal >= 2: the experts are most of the
  weights), with ``all_to_all_bytes``, what EP sends instead.

    python benchmarks/bench_moe_ep.py [--trials 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from bench_moe import MOE_INTERMEDIATE, SIZES, save  # noqa: E402 (beside this script)
from bench_train_step import trainer_step, workload_batch  # noqa: E402
from transport_report import at_least, load_warning  # noqa: E402

WORLD = 2
TIMEOUT_S = 900  # two ranks, two models, cold imports, on a loaded 2-core machine
MODES = {"ep2": 2, "fsdp": 1}  # name -> trainer.expert_parallel


def counting(sent: dict) -> None:
    """Count the bytes each rank receives from FSDP2's all-gathers and EP's all-to-alls."""
    import torch.distributed as dist

    for name in ("all_gather_single", "all_to_all_single"):
        original = getattr(dist, name)

        def counted(out, *a, _original=original, _name=name, **kw):
            sent[_name] = sent.get(_name, 0) + out.numel() * out.element_size()
            return _original(out, *a, **kw)

        setattr(dist, name, counted)


def rank_main(model_dir: str, trials: int, warmup: int) -> None:
    torch.set_num_threads(1)
    from areal_like.daemon import exit_process
    from areal_like.settings.config import load_config
    from trainer.model import build_policy, init_distributed, leave_distributed
    from trainer.step import StepSettings

    batch = workload_batch(8, 8, 8)
    runs = {}
    for name, ep in MODES.items():
        cfg = load_config([f"model.path={model_dir}", "task=addition", "loss=decoupled_ppo",
                           "trainer.lr=3e-5", "trainer.skip_zero_advantage=false",
                           "trainer.micro_batch_size=64", f"trainer.expert_parallel={ep}"])
        rank, _ = init_distributed(cfg.trainer)
        runs[name] = (build_policy(cfg.model, cfg.trainer), StepSettings.from_config(cfg))
    sent: dict = {}
    counting(sent)
    per_step = {}
    for name, (policy, settings) in runs.items():
        sent.clear()
        trainer_step(policy, batch, settings)
        per_step[name] = dict(sent)
    for _ in range(warmup):
        for policy, settings in runs.values():
            trainer_step(policy, batch, settings)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(trials):
        for name, (policy, settings) in runs.items():
            t0 = time.perf_counter()
            trainer_step(policy, batch, settings)
            times[name].append(time.perf_counter() - t0)
    # every rank's median step: the slowest rank's is the step's
    med = torch.tensor([statistics.median(times[n]) for n in MODES], dtype=torch.float64)
    torch.distributed.all_reduce(med, op=torch.distributed.ReduceOp.MAX)
    if rank == 0:
        tps = {n: batch.n_tokens / float(t) for n, t in zip(MODES, med)}
        gathered = {n: per_step[n].get("all_gather_single", 0) for n in MODES}
        common = {"experts": 8, "top_k": 2, "ranks": WORLD, "tokens": batch.n_tokens,
                  "trials": trials, **load_warning()}
        print(json.dumps({"name": "moe_ep2_step", "figure": round(tps["ep2"], 1),
                          "unit": "trained tokens/s (median step, slowest rank)",
                          "baseline": round(tps["fsdp"], 1),
                          "ratio": round(tps["ep2"] / tps["fsdp"], 3), "goal": 1.0, **common}))
        print(json.dumps({"name": "moe_ep2_all_gather_bytes", "figure": gathered["ep2"],
                          "unit": "bytes all-gathered per step and rank",
                          "baseline": gathered["fsdp"],
                          "ratio": round(gathered["fsdp"] / max(gathered["ep2"], 1), 3),
                          "goal": 2.0,
                          "all_to_all_bytes": per_step["ep2"].get("all_to_all_single", 0),
                          **common}), flush=True)
    leave_distributed()
    exit_process(0)  # as the trainer exits (FSDP's caches hold the gloo group's threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=at_least(1), default=10)
    ap.add_argument("--warmup", type=at_least(0), default=2)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)  # set for the ranks
    args = ap.parse_args()
    if args.model_dir:
        return rank_main(args.model_dir, args.trials, args.warmup)
    from transformers import Qwen3MoeConfig

    from areal_like.net.distributed import free_port

    config = Qwen3MoeConfig(**SIZES, num_experts=8, intermediate_size=256, num_experts_per_tok=2,
                            moe_intermediate_size=MOE_INTERMEDIATE)
    with tempfile.TemporaryDirectory() as tmp:
        path = save(config, Path(tmp) / "moe")
        port = str(free_port())
        procs = [subprocess.Popen(
            [sys.executable, __file__, "--trials", str(args.trials), "--warmup",
             str(args.warmup), "--model-dir", str(path)],
            env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "LOCAL_RANK": str(r),
                 "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
            for r in range(WORLD)]
        try:
            codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
        finally:
            for p in procs:  # by PID, whatever happened
                if p.poll() is None:
                    p.kill()
                    p.wait()
    if codes != [0] * WORLD:
        raise SystemExit(f"a rank failed: exit codes {codes}")


if __name__ == "__main__":
    main()
