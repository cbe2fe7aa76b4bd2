"""Weight sync through the real code path (trainer sender -> 2 embedded engines over HTTP) vs one
flat broadcast.

Three processes on loopback. Rank 0 plays trainer rank 0: it builds a Qwen2
(``areal_like.weights.hf.build_model``; default hidden 512, 4 layers, vocab 8192: ~24M fp32
parameters, ~96 MB) and sends it in the buckets of ``areal_like.weights.plan.plan_buckets`` (64
MB). Ranks 1-2 each run a real ``EmbeddedEngine`` (HTTP server, scheduler, ``WeightUpdater``) with a
differently initialised copy of the model, and apply every sync exactly as a rollout server does:
``areal_like.weights.push.apply_weight_sync`` over ``SGLangClient`` (``/pause_generation``,
``/begin_weight_update``, one ``/update_weights_from_distributed`` per bucket,
``/end_weight_update``, ``/continue_generation``). The weight group is formed once, as in a real run
(``/init_weights_update_group`` + rank 0's join).

Cases, interleaved in every trial, one JSON line each for the two sync formats:
* ``flattened`` (what the system does): each bucket packed into one uint8 buffer and broadcast with
  one op (``BucketPipeline``: two staging buffers, one broadcast in flight); the engine receives
  it into a spare buffer and swaps it in as the parameters' storage (``load_format:
  "flattened_bucket"``, as SGLang's FlattenedTensorBucket). The first two buckets (one per staging
  buffer) are packed before the start barrier because ``WeightBroadcaster.push`` packs them before
  it publishes the plan, i.e. before any engine is asked to pause; later buckets (with
  ``--bucket-mb`` small enough to have more than two) are packed inside the measured window;
* ``per_tensor`` (the previous format, SGLang's default): one async broadcast per tensor, the
  engine receives into fresh buffers and copies them into the parameters;
* ``flat`` (baseline): the same number of bytes as one flat fp32 broadcast on the same weight group,
  received into one preallocated buffer, no HTTP, no load: the transport's ceiling, same run.

Per line: figure = bytes / t_loaded (GB/s) with t_loaded = from the common start (a barrier) to the
slowest engine's answer to its last ``/update_weights_from_distributed`` (received AND loaded),
baseline = bytes / t_flat, ratio = t_flat / t_loaded (goal >= 0.85); ``pause_s`` = the slowest
engine's real pause window (``SyncDone.pause_s``: ``/pause_generation`` sent until
``/continue_generation`` answered), ``pause_over_transfer`` = pause / t_flat (goal <= 1.2). Median
of ``--trials`` trials after one warm-up; ``ratio_paired`` is the median over trials of each trial's
flat time over its own sync time (robust to load that drifts during the run). The engines are idle
(no requests to abort) and the trainer-side FSDP all-gather is not included. After the trials the
engines' weights are checked to equal the sender's exactly (SHA-256), so a fast wrong sync cannot
pass.

History: this benchmark used to time only the broadcasts between bare processes (receivers
calling ``dist.broadcast`` into the parameters or into fresh buffers, no engine, no HTTP), which
left out the pause, the HTTP round trips and the load that an engine really goes through. It now
drives the real sender and real engines, so the same goals are measured on a harder workload.

    .venv/bin/python benchmarks/bench_weight_sync.py                      # ~96 MB, < 60 s
    .venv/bin/python benchmarks/bench_weight_sync.py --hidden 1024 --layers 8 --bucket-mb 64

``--system`` (a small model, < 10 MB): the real system twice (buffer, 1 rollout server with the
embedded engine generating, a 1-rank trainer; tiny Qwen2, 1.3 MB, 2-digit addition, 8 x 8
samples, 8 new tokens, eta 4, pinned cores), with ``trainer.weight_sync.overlap`` false and true;
figure = median time the trainer spends in ``push`` per version (its ``weight_sync`` phase) with
overlap, baseline = without, ratio = baseline / figure (higher is better), goal: figure <= 20 ms:

    .venv/bin/python benchmarks/bench_weight_sync.py --system [--steps 25]

``--system --lora 8`` (LoRA, ``trainer.lora``): the real system twice on a Qwen2 of ``--hidden`` x
``--layers``, at the defaults (``overlap`` on; ``--blocking``: every push blocks), full weights
(baseline) against the rank-8 adapter alone (figure): trainer-blocked ms and bytes per version,
goal ratio >= 20. A model beyond the two staging buckets (128 MB), as every model LoRA is for,
keeps its full push blocking:

    .venv/bin/python benchmarks/bench_weight_sync.py --system --lora 8 --hidden 768 --layers 8
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from transport_report import at_least, load_warning, number_in  # noqa: E402

GROUP_TIMEOUT_S = 120.0  # rendezvous and every op; the whole benchmark must fit in well under it
GROUP = "bench_weights"
# flattened last: the final checksum checks the system's path
CASES = ("flat", "per_tensor", "flattened")


def model_config(args: argparse.Namespace, seed: int):
    from areal_like.settings.config import ModelConfig

    heads = max(1, args.hidden // 64)
    return ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                       intermediate_size=4 * args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=heads,
                       num_key_value_heads=max(1, heads // 2), max_position_embeddings=256,
                       init_seed=seed)


def sender(args: argparse.Namespace, wport: int, buckets, model):
    """Rank 0: one function per case, each returns when its last broadcast completed."""
    import torch
    import torch.distributed as dist

    from areal_like.net.auth import ENGINE_KEY_ENV
    from areal_like.net.distributed import init_weight_group
    from trainer.weight_buckets import BucketPipeline

    pg = init_weight_group("gloo", "127.0.0.1", wport, 3, 0, GROUP, GROUP_TIMEOUT_S,
                           key=os.environ[ENGINE_KEY_ENV])
    params = dict(model.named_parameters())
    nbytes = sum(p.numel() * p.element_size() for p in params.values())
    flat = torch.randn(nbytes // 4)
    pipeline = BucketPipeline()

    # before the start, as WeightBroadcaster.push packs them before it publishes the plan
    def stage_first():
        for b in buckets[:BucketPipeline.SLOTS]:
            pipeline.stage([params[n].detach() for n in b.names])

    def flattened():
        while pipeline.staged:
            pipeline.launch(pg)
        for b in buckets[BucketPipeline.SLOTS:]:
            pipeline.send([params[n].detach() for n in b.names], pg)
        pipeline.finish()

    def per_tensor():
        for b in buckets:
            for w in [dist.broadcast(params[n].detach(), group_src=0, group=pg, async_op=True)
                      for n in b.names]:
                w.wait()

    return {"flat": lambda: dist.broadcast(flat, group_src=0, group=pg), "flattened": flattened,
            "per_tensor": per_tensor}, stage_first, nbytes


async def receiver_trials(args: argparse.Namespace, rank: int, wport: int, buckets, engine) -> dict:
    """Ranks 1-2: drive this engine through every trial as a rollout server would."""
    import torch
    import torch.distributed as dist

    from areal_like.engines.sglang import SGLangClient
    from areal_like.weights.plan import SyncMember, WeightSyncPlan
    from areal_like.weights.push import apply_weight_sync
    from areal_like.wire.weight_wire import FLATTENED

    last_update = [0.0]

    def stamp(method, path, status, body, raw):
        if path == "/update_weights_from_distributed":
            last_update[0] = time.perf_counter()

    results = {c: [] for c in CASES}
    async with SGLangClient(engine.url, timeout_s=GROUP_TIMEOUT_S, on_response=stamp) as client:
        await client.init_weights_update_group(master_address="127.0.0.1", master_port=wport,
                                               rank_offset=rank,
                                               world_size=3, group_name=GROUP, backend="gloo",
                                               timeout_s=GROUP_TIMEOUT_S)
        pg = engine.weights.groups[GROUP]
        flat = torch.empty(sum(p.numel() for p in engine.model.parameters()))
        members = [SyncMember(server_id=f"engine-{r}", rank_offset=r) for r in (1, 2)]
        version = 0
        for trial in range(args.trials + 1):
            for case in CASES:
                version += 1
                plan = WeightSyncPlan(policy_version=version, group_name=GROUP,
                                      master_addr="127.0.0.1",
                                      master_port=wport, world_size=3, backend="gloo", reform=False,
                                      members=members, buckets=buckets, deadline_s=GROUP_TIMEOUT_S)
                dist.barrier()
                t0 = time.perf_counter()
                if case == "flat":
                    dist.broadcast(flat, group_src=0, group=pg)
                    loaded = pause = time.perf_counter() - t0
                else:
                    done = await apply_weight_sync(client, plan, f"engine-{rank}",
                                                   load_format=(FLATTENED if case == "flattened"
                                                                else None))
                    if not done.ok:
                        raise RuntimeError(f"sync failed: {done.reason}")
                    loaded, pause = last_update[0] - t0, done.pause_s
                results[case].append(_slowest(loaded, pause, trial))
    return results


def _slowest(loaded: float, pause: float, trial: int) -> tuple[float, float] | None:
    import torch
    import torch.distributed as dist

    t = torch.tensor([loaded, pause], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank: when the last engine is done
    return (float(t[0]), float(t[1])) if trial > 0 else None


def worker(rank: int, cport: int, wport: int, args: argparse.Namespace) -> None:
    import asyncio

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO))
    from areal_like.net.auth import ENGINE_KEY_ENV
    from areal_like.settings.config import EngineConfig
    from areal_like.weights.hf import build_model
    from areal_like.weights.plan import plan_buckets
    from benchmarks.weight_checksum import state_checksum
    from rollout_server.engine import EmbeddedEngine

    engine = None
    if rank == 0:
        model = build_model(model_config(args, seed=7))
    else:
        engine = EmbeddedEngine(model_config(args, seed=rank),
                                EngineConfig(max_running_requests=4, max_total_tokens=512),
                                group_key=os.environ[ENGINE_KEY_ENV]).start()
        model = engine.model
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{cport}", rank=rank,
                                world_size=3)
        buckets = plan_buckets([(n, list(p.shape), "float32") for n, p in model.named_parameters()],
                               int(args.bucket_mb * 1024 * 1024))
        if rank == 0:
            cases, stage_first, nbytes = sender(args, wport, buckets, model)
            results = {c: [] for c in CASES}
            for trial in range(args.trials + 1):
                for case in CASES:
                    if case == "flattened":
                        stage_first()
                    dist.barrier()
                    t0 = time.perf_counter()
                    cases[case]()
                    results[case].append(_slowest(time.perf_counter() - t0, 0.0, trial))
        else:
            results = asyncio.run(receiver_trials(args, rank, wport, buckets, engine))
        sums = [None] * 3
        dist.all_gather_object(sums, state_checksum(model))
        if rank == 0:
            if len(set(sums)) != 1:
                raise SystemExit(f"engine weights differ from the sender's after the syncs: {sums}")
            report(results, nbytes, len(buckets), sum(len(b.names) for b in buckets), args)
    finally:
        if engine is not None:
            engine.stop()
    os._exit(0)  # skip interpreter teardown: destroying gloo groups at exit can abort the process


def report(results: dict, nbytes: int, n_buckets: int, n_tensors: int,
           args: argparse.Namespace) -> None:
    t_flat = statistics.median(r[0] for r in results["flat"] if r)
    best_flat = min(r[0] for r in results["flat"] if r)
    flats = [r[0] for r in results["flat"] if r]
    for case in ("flattened", "per_tensor"):
        rows = [r for r in results[case] if r]
        t_load, pause = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
        # each trial against its own flat round
        paired = statistics.median(f / r[0] for f, r in zip(flats, rows))
        print(json.dumps({
            "name": f"weight_sync_{case}_vs_flat", "figure": round(nbytes / t_load / 1e9, 3),
            "unit": "GB/s", "baseline": round(nbytes / t_flat / 1e9, 3),
            "ratio": round(t_flat / t_load, 3), "goal": 0.85, "loaded_s": round(t_load, 4),
            "pause_s": round(pause, 4), "transfer_s": round(t_flat, 4),
            "pause_over_transfer": round(pause / t_flat, 3), "pause_goal": "<= 1.2",
            "ratio_best_trials": round(best_flat / min(r[0] for r in rows), 3),
            "ratio_paired": round(paired, 3), "bytes": nbytes, "tensors": n_tensors,
            "buckets": n_buckets, "bucket_mb": args.bucket_mb,
            "receivers": 2, "trials": args.trials, "backend": "gloo", "load": os.getloadavg()[0],
            **load_warning(),
        }), flush=True)


def system_run(run_dir: Path, overlap: bool, args: argparse.Namespace,
               extra: list[str] = ()) -> list[dict]:
    """One run of the real system on the small-model workload; the trainer's per-step records."""
    from areal_like.settings.config import load_config
    from launch.job import job_specs, prepare
    from launch.local import Supervisor
    from launch.records import step_records

    cfg = load_config(["experiment=bench_async", "task=addition", "task.max_new_tokens=8",
                       "task.temperature=1.0", "buffer.groups_per_step=8",
                       f"buffer.max_staleness={args.eta}", f"trainer.steps={args.steps}",
                       "trainer.lr=3e-5", f"trainer.weight_sync.overlap={str(overlap).lower()}",
                       f"run_dir={run_dir}", *extra])
    cfg, topo, path = prepare(cfg, cpus=sorted(os.sched_getaffinity(0))[:2])
    sup = Supervisor(job_specs(cfg, topo, path), run_dir, restarts=0, health_timeout_s=300,
                     echo=lambda _: None)
    if sup.run() != 0:
        raise SystemExit(f"overlap={overlap} run failed: {sup.outcome}; logs in {run_dir / 'logs'}")
    return step_records(run_dir)


def system_blocked(args: argparse.Namespace) -> None:
    """``--system``: the trainer's blocked time per version in the real system (tiny model, 1.3 MB),
    with ``trainer.weight_sync.overlap`` false (baseline: every push blocks to the end) and true."""
    import tempfile

    sys.path.insert(0, str(REPO))
    med: dict[bool, float] = {}
    extra: dict[str, object] = {}
    tmp = tempfile.mkdtemp(prefix="bench_ws_system_")  # kept with a failed run's logs
    for overlap in (False, True):
        recs = system_run(Path(tmp) / f"overlap_{overlap}", overlap, args)[args.skip:]
        blocked = [r["phase_seconds"]["weight_sync"] for r in recs]
        med[overlap] = statistics.median(blocked)
        extra[f"sync_s_overlap_{overlap}"] = round(
            statistics.median(r["weight_sync"]["seconds"] for r in recs), 4)
        extra[f"step_s_overlap_{overlap}"] = round(
            statistics.median(r["step_seconds"] for r in recs), 4)
        extra["bytes"] = recs[-1]["weight_sync"]["bytes"]
    shutil.rmtree(tmp)
    print(json.dumps({
        **blocked_line(med[True], med[False]), **extra,
        "steps": args.steps, "skip": args.skip, "eta": args.eta, "load": os.getloadavg()[0],
        **load_warning(),
    }), flush=True)


def blocked_line(overlap_s: float, blocking_s: float) -> dict:
    """``--system``'s common keys: the trainer's blocked seconds per version with and without
    overlap."""
    return {"name": "weight_sync_trainer_blocked_small_model", "figure": round(overlap_s * 1e3, 2),
            "unit": "ms trainer blocked per version (median)",
            "baseline": round(blocking_s * 1e3, 2), "ratio": round(blocking_s / overlap_s, 4),
            "goal": "figure <= 20 ms"}


def system_lora(args: argparse.Namespace) -> None:
    """``--system --lora R``: the real system twice on a Qwen2 of ``--hidden`` x ``--layers``
    (overlap as the defaults, off with ``--blocking``): full weights (baseline) and a rank-R LoRA
    adapter alone (figure); bytes and the trainer's blocked time per version."""
    import tempfile

    sys.path.insert(0, str(REPO))
    heads = max(1, args.hidden // 64)
    model = [f"model.hidden_size={args.hidden}", f"model.intermediate_size={4 * args.hidden}",
             f"model.num_hidden_layers={args.layers}", f"model.num_attention_heads={heads}",
             f"model.num_key_value_heads={max(1, heads // 2)}", "model.init_seed=0"]
    out: dict[str, dict] = {}
    tmp = tempfile.mkdtemp(prefix="bench_ws_lora_")  # kept with a failed run's logs
    for case, lora in (("full", []), ("lora", [f"trainer.lora.rank={args.lora}"])):
        recs = system_run(Path(tmp) / case, not args.blocking, args, [*model, *lora])[args.skip:]
        blocked = statistics.median(r["phase_seconds"]["weight_sync"] for r in recs)
        out[case] = {"blocked": blocked, "bytes": recs[-1]["weight_sync"]["bytes"],
                     "step_s": statistics.median(r["step_seconds"] for r in recs)}
    shutil.rmtree(tmp)
    full, lora = out["full"], out["lora"]
    print(json.dumps({
        "name": "weight_sync_lora_adapter_vs_full", "figure": round(lora["blocked"] * 1e3, 2),
        "unit": "ms trainer blocked per version (median, overlap "
                f"{'off' if args.blocking else 'on'})",
        "baseline": round(full["blocked"] * 1e3, 2),
        "ratio": round(full["blocked"] / lora["blocked"], 1),
        "goal": "ratio >= 20 (rank 8, >= 8 layers)", "bytes_lora": lora["bytes"],
        "bytes_full": full["bytes"], "step_s_lora": round(lora["step_s"], 4),
        "step_s_full": round(full["step_s"], 4), "rank": args.lora, "hidden": args.hidden,
        "layers": args.layers,
        "steps": args.steps, "skip": args.skip, "load": os.getloadavg()[0], **load_warning(),
    }), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=at_least(1), default=512)
    ap.add_argument("--layers", type=at_least(1), default=4)
    ap.add_argument("--vocab", type=at_least(1), default=8192)
    ap.add_argument("--bucket-mb", type=number_in(0), default=64.0)
    # the machine is shared: medians need the rounds
    ap.add_argument("--trials", type=at_least(1), default=25)
    ap.add_argument("--system", action="store_true",
                    help="trainer-blocked time per version in the real system")
    ap.add_argument("--steps", type=at_least(1), default=25, help="--system: steps per run")
    ap.add_argument("--skip", type=at_least(0), default=5, help="--system: warm-up steps left out")
    ap.add_argument("--eta", type=at_least(0), default=4, help="--system: buffer.max_staleness")
    ap.add_argument("--lora", type=at_least(0), default=0,
                    help="--system: a LoRA rank-R adapter's sync vs the full weights")
    ap.add_argument("--blocking", action="store_true",
                    help="--system --lora: every push blocks (weight_sync.overlap=false)")
    ap.add_argument("--rank", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--ports", type=str, default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if (args.lora or args.blocking) and not args.system:
        ap.error("--lora and --blocking measure the real system: add --system")
    if args.system and not 0 <= args.skip < args.steps:
        ap.error(f"--skip {args.skip} leaves none of --steps {args.steps} to measure")
    if args.system and args.lora:
        system_lora(args)
        return
    if args.system:
        system_blocked(args)
        return
    if args.rank >= 0:
        cport, wport = map(int, args.ports.split(","))
        worker(args.rank, cport, wport, args)
        return
    sys.path.insert(0, str(REPO))
    from areal_like.net.auth import ENGINE_KEY_ENV
    from areal_like.net.distributed import free_port

    ports = f"{free_port()},{free_port()}"
    # the job's engine key, as `areal-like run` hands it to its daemons: rank 0's gate asks for
    # it, the engines' doors prove it
    env = {**os.environ, "OMP_NUM_THREADS": "1", ENGINE_KEY_ENV: secrets.token_hex(16)}
    procs = [subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--rank", str(r),
                               "--ports", ports],
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
