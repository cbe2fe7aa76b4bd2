"""What a weight version costs with the real SGLang (0.5.23, CPU), per pause mode and bucket size.

One SGLang server launched as ``topology=cpu_sglang`` launches it (``SGLangProcess``), serving a
Qwen2 of ``--hidden``/``--layers`` (default 512 x 12: 181 MiB of float32), kept busy by
``--requests`` long generations that are resubmitted across every pause exactly as a rollout
server's episodes are (``rollout_server.episode.generate_sample``). A sender process plays trainer
rank 0: it joins the weight group once and, per version, broadcasts the model in the buckets of
``areal_like.weights.plan.plan_buckets`` (``BucketPipeline``, flattened) while this process
applies the version as a rollout server does (``apply_weight_sync`` with the case's pause mode).

Cases: every pause mode SGLang 0.5.23 offers (``/pause_generation`` ``mode``: ``abort``,
``retract``, ``in_place``; ``sglang/srt/managers/io_struct.py``) x every ``--bucket-mb``. Per
version, measured:

* ``pause_s``: the engine's pause (``SyncDone.pause_s``: ``/pause_generation`` sent until
  ``/continue_generation`` answered): the ``figure``, median over ``--versions``;
* ``blocked_s``: the trainer's blocked time, from its push command until its last broadcast
  completed;
* ``resume_s``: from the start of the sync until the engine holds more KV than right after it
  (generation is running again).

One JSON line per case: ``figure`` (engine pause per version, s), ``baseline`` (the abort mode's,
same bucket size, same run), ``ratio`` = baseline / figure (higher is better), ``goal`` (pause at
most 0.1 s and at most a tenth of abort's), ``ok`` (every version applied), the medians above,
and ``warning`` when the machine was loaded. Needs the tier's environment
(tests/sglang/setup_env.sh). The pause includes the transfer (the engine is paused while the
buckets arrive), so ``--hidden 128 --layers 2`` (the quickstart's 2 MB model) shows the pause
mode alone:

    .sglang-env/bin/python benchmarks/bench_sglang_sync.py                   # ~10 minutes
    .sglang-env/bin/python benchmarks/bench_sglang_sync.py --hidden 128 --layers 2 --bucket-mb 64
    .sglang-env/bin/python benchmarks/bench_sglang_sync.py --bucket-mb 64 256 --versions 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.transport_report import at_least, number_in  # noqa: E402

GROUP_TIMEOUT_S = 300.0
MODES = ("abort", "retract", "in_place")  # SGLang 0.5.23's PauseGenerationReqInput.mode
GOAL_PAUSE_S = 0.1


def model_config(args, path: str | None = None, seed: int = 0):
    from areal_like.settings.config import ModelConfig

    heads = max(1, args.hidden // 64)
    return ModelConfig(
        vocab_size=104,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=4096,
        dtype="float32",
        init_seed=seed,
        path=path,
    )


def sender_main(spec: dict) -> None:
    """Trainer rank 0: join the group, then per stdin line (a bucket plan) broadcast the model."""
    import torch

    torch.set_num_threads(1)
    from areal_like.net.distributed import init_weight_group
    from areal_like.weights.hf import build_model
    from trainer.weight_buckets import BucketPipeline

    state = build_model(model_config(argparse.Namespace(**spec["model"]), seed=1)).state_dict()
    print("ready", flush=True)
    pg = init_weight_group("gloo", "127.0.0.1", spec["port"], 2, 0, spec["group"], GROUP_TIMEOUT_S,
                           key=spec["key"])
    print("joined", flush=True)
    pipeline = BucketPipeline()
    for line in sys.stdin:
        t0 = time.perf_counter()
        for names in json.loads(line):
            pipeline.send([state[n] for n in names], pg)
        pipeline.finish()
        print(json.dumps({"blocked_s": time.perf_counter() - t0}), flush=True)
    os._exit(0)  # skip interpreter teardown: destroying a gloo group at exit can abort the process


def plan(version: int, buckets, port: int, group: str, reform: bool):
    from areal_like.weights.plan import SyncMember, WeightSyncPlan

    return WeightSyncPlan(
        policy_version=version,
        group_name=group,
        master_addr="127.0.0.1",
        master_port=port,
        world_size=2,
        backend="gloo",
        reform=reform,
        buckets=buckets,
        deadline_s=GROUP_TIMEOUT_S,
        members=[SyncMember(server_id="bench", rank_offset=1)],
    )


async def busy(client, prompt: list[int], stop: asyncio.Event, version) -> None:
    """One of the engine's clients: long generations, back to back, resubmitted across pauses."""
    from rollout_server.episode import generate_sample

    while not stop.is_set():
        await generate_sample(
            client, prompt, {"temperature": 1.0, "ignore_eos": True}, 2000, version
        )


async def used_tokens(client) -> int:
    return sum(int(x.get("num_used_tokens") or 0) for x in await client.loads())


async def one_version(client, sender, p, mode: str) -> dict:
    """Apply one version under load; the three timings of it (module docstring)."""
    from areal_like.weights.push import apply_weight_sync
    from areal_like.weights.server_sync import local_door

    t0 = time.perf_counter()
    sender.stdin.write(json.dumps([b.names for b in p.buckets]) + "\n")
    sender.stdin.flush()
    door = local_door(client.base_url, client.api_key)
    done = await apply_weight_sync(client, p, "bench", door=door,
                                   pause_mode=mode)
    if not done.ok:
        print(
            f"[bench_sglang_sync] {mode} v{p.policy_version}: {done.reason}",
            file=sys.stderr,
            flush=True,
        )
    after = await used_tokens(client)
    while await used_tokens(client) <= after and time.perf_counter() - t0 < 60:
        await asyncio.sleep(0.005)
    resume_s = time.perf_counter() - t0
    try:  # a sync that failed before the last bucket leaves the sender blocked in its broadcast
        line = await asyncio.wait_for(asyncio.to_thread(sender.stdout.readline), 60)
    except asyncio.TimeoutError:
        raise RuntimeError(
            f"version {p.policy_version} ({mode}) failed before the broadcast ended: {done.reason}"
        )
    blocked = json.loads(line)["blocked_s"]
    return {
        "ok": done.ok,
        "reason": done.reason,
        "pause_s": done.pause_s,
        "blocked_s": blocked,
        "resume_s": resume_s,
    }


async def run_case(server, args, mode: str, bucket_mb: float, first_version: int) -> list[dict]:
    """``--versions`` versions of one case on a busy engine, through one weight group."""
    from areal_like.engines.sglang import SGLangClient
    from areal_like.net.distributed import free_port
    from areal_like.weights.hf import build_model
    from areal_like.weights.plan import plan_buckets

    state = build_model(model_config(args)).state_dict()
    buckets = plan_buckets(
        [(n, list(t.shape), "float32") for n, t in state.items()], int(bucket_mb * 2**20)
    )
    port, group = free_port(), f"bench_sglang_{mode}_{int(bucket_mb)}_{os.getpid()}"
    # key: the job's engine key, which the engine's door (``local_door``) proves to its gate
    spec = {"model": {"hidden": args.hidden, "layers": args.layers}, "port": port, "group": group,
            "key": server.api_key}
    sender = subprocess.Popen(
        [sys.executable, __file__, "--sender", json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    stop, version = asyncio.Event(), [first_version - 1]
    client = SGLangClient(server.url, api_key=server.api_key, timeout_s=GROUP_TIMEOUT_S)
    load = [
        asyncio.create_task(busy(client, [1, 20 + i, 21 + i], stop, lambda: version[0]))
        for i in range(args.requests)
    ]
    try:
        assert (await asyncio.to_thread(sender.stdout.readline)).strip() == "ready"
        while await used_tokens(client) < args.requests * 64:  # every request well into its decode
            await asyncio.sleep(0.05)
        out = []
        for i in range(args.versions + 1):  # the first forms the group: a warm-up, not reported
            p = plan(first_version + i, buckets, port, group, reform=i == 0)
            if i == 0:
                sender.stdin.write(json.dumps([b.names for b in buckets]) + "\n")
                sender.stdin.flush()
            r = (
                await one_version(client, sender, p, mode)
                if i
                else await _form(client, sender, p, mode)
            )
            version[0] = first_version + i
            out += [dict(r, buckets=len(buckets))] if i else []
        return out
    finally:
        stop.set()
        for t in load:  # a cancelled request closes its connection: SGLang aborts it
            t.cancel()
        await asyncio.gather(*load, return_exceptions=True)
        await client.abort_request(abort_all=True)
        await client.close()
        sender.stdin.close()
        sender.wait(timeout=60)


async def _form(client, sender, p, mode: str) -> dict:
    """The warm-up version, which forms the group (abort mode: the group is its point)."""
    from areal_like.weights.push import apply_weight_sync
    from areal_like.weights.server_sync import local_door

    door = local_door(client.base_url, client.api_key)
    done = await apply_weight_sync(client, p, "bench", door=door,
                                   pause_mode="abort")
    assert (await asyncio.to_thread(sender.stdout.readline)).strip() == "joined"
    await asyncio.to_thread(sender.stdout.readline)
    if not done.ok:
        raise RuntimeError(f"the weight group did not form: {done.reason}")
    return {}


def start_server(args, tmp: Path):
    import secrets
    from dataclasses import replace

    from areal_like.settings.config import load_config
    from areal_like.tasks.tokenizer import char_tokenizer
    from areal_like.weights.hf import build_model
    from rollout_server.launch_sglang import SGLangProcess

    build_model(model_config(args)).save_pretrained(tmp / "model")
    char_tokenizer().save_pretrained(tmp / "model")
    engine = load_config(["topology=cpu_sglang"]).rollout.engine
    engine = replace(engine, sglang={**engine.sglang, "max_total_tokens": 65536})
    key = secrets.token_hex(16)  # hex: never starts with "-", which SGLang reads as a flag
    proc = SGLangProcess(
        model_config(args, path=str(tmp / "model")), engine, str(tmp / "sglang.log"), api_key=key
    )
    proc.api_key = key
    return proc.start()


def summarize(
    mode: str, mb: float, runs: list[dict], baseline: float | None, warning: str | None, model: str
) -> dict:
    med = {
        k: round(statistics.median(r[k] for r in runs), 4)
        for k in ("pause_s", "blocked_s", "resume_s")
    }
    figure = med["pause_s"]
    ratio = round(baseline / figure, 2) if baseline and figure else None
    return {
        "name": f"sglang_sync_pause/{mode}/{int(mb)}MB/{model}",
        "figure": figure,
        "unit": "s",
        "baseline": baseline,
        "ratio": ratio,
        "goal": f"engine pause per version <= {GOAL_PAUSE_S} s and <= baseline/10 (ratio >= 10), "
        "per-token versions exact (tests/sglang/test_sglang_weights.py)",
        "ok": all(r["ok"] for r in runs),
        "errors": sorted({r["reason"] for r in runs if r["reason"]}),
        "pause_mode": mode,
        "bucket_mb": mb,
        "buckets": runs[0]["buckets"],
        "versions": len(runs),
        **med,
        "pauses_s": [round(r["pause_s"], 4) for r in runs],
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "warning": warning,
    }


def load_warning() -> str | None:
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    return (
        f"loaded machine (1-minute load {load:.1f} on {cpus} CPUs): compare ratios of one run only"
        if load > cpus
        else None
    )


async def bench(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(args, Path(tmp))
        size = sum(f.stat().st_size for f in (Path(tmp) / "model").glob("*.safetensors"))
        model = f"h{args.hidden}x{args.layers}_{size / 2**20:.0f}MB"
        try:
            version = 1
            for mb in args.bucket_mb:
                baseline = None
                for mode in args.modes:  # abort first: it is the baseline of the others
                    runs = await run_case(server, args, mode, mb, version)
                    version += args.versions + 1
                    if mode == "abort":
                        baseline = statistics.median(r["pause_s"] for r in runs)
                    line = summarize(mode, mb, runs, baseline, load_warning(), model)
                    if line["warning"]:
                        print(f"[bench_sglang_sync] WARNING: {line['warning']}", file=sys.stderr)
                    print(json.dumps(line), flush=True)
        finally:
            server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=at_least(1), default=512)
    ap.add_argument("--layers", type=at_least(1), default=12)
    ap.add_argument(
        "--requests", type=at_least(1), default=8, help="long generations keeping the engine busy"
    )
    ap.add_argument("--versions", type=at_least(1), default=5, help="measured versions per case")
    ap.add_argument("--bucket-mb", type=number_in(0), nargs="+", default=[64.0, 128.0, 256.0])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--sender", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sender:
        sender_main(json.loads(args.sender))
        return
    if args.modes[0] != "abort":
        ap.error("--modes must start with abort (the baseline)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
