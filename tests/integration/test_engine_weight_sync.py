"""Engine weight updates over gloo from a sender process (per tensor and flattened buckets), each
labelled with its sender's seed; and the standalone engine process."""

from __future__ import annotations

import asyncio
import json
import queue
import secrets
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from areal_like.engines.sglang import SGLangClient
from areal_like.net.auth import ENGINE_KEY_ENV, KEY_FILE
from areal_like.net.distributed import free_port
from areal_like.settings.config import EngineConfig, ModelConfig
from areal_like.tasks.tokenizer import char_tokenizer
from areal_like.weights.hf import build_model
from areal_like.weights.plan import BucketSpec, SyncMember, WeightSyncPlan, plan_buckets
from areal_like.weights.push import apply_weight_sync
from benchmarks.weight_checksum import state_checksum
from rollout_server.engine import EmbeddedEngine

HTTP_TIMEOUT_S = 180.0  # init_weights_update_group waits for the sender's imports under load
PROCESS_START_S = 180.0
GROUP = "areal_like_weights"
KEY = secrets.token_hex(16)  # the job's engine key: the sender's gate asks, the engine proves it
MODEL = ModelConfig(max_position_embeddings=128)

SENDER = (Path(__file__).resolve().parents[1] / "weight_sender.py").read_text()  # group rank 0
# syncs in a row: fp32 (swapped in), fp32 again (received into the buffer the first one retired),
# bf16 on the wire into the fp32 engine (cannot be swapped: copied with a cast), fp32 (swapped)
ROUNDS = [{"seed": 21, "dtype": "float32"}, {"seed": 22, "dtype": "float32"},
          {"seed": 23, "dtype": "bfloat16"}, {"seed": 24, "dtype": "float32"}]


def post(url: str, path: str, body: dict | None = None) -> tuple[int, dict | str]:
    req = urllib.request.Request(url + path, data=json.dumps(body or {}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
            text, status = r.read().decode(), r.status
    except urllib.error.HTTPError as e:
        text, status = e.read().decode(), e.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def read_line(proc, prefix: str, timeout_s: float = PROCESS_START_S) -> str:
    """The first stdout line of ``proc`` starting with ``prefix`` (bounded wait)."""
    found: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: found.put(next(
        (ln.strip() for ln in proc.stdout if ln.startswith(prefix)), "")), daemon=True).start()
    try:
        line = found.get(timeout=timeout_s)
    except queue.Empty:
        line = ""
    why = proc.stderr.read()[-2000:] if proc.poll() is not None else "(still running)"
    assert line, f"no {prefix!r} line from pid {proc.pid}; stderr: {why}"
    return line


def specs(engine) -> list[BucketSpec]:
    """The engine's parameters in the trainer's float32 buckets of 40 kB (several)."""
    names = [(n, list(p.shape)) for n, p in engine.model.named_parameters()]
    return plan_buckets([(n, s, "float32") for n, s in names], 40_000)


def spawn_sender(spawn_python, port: int, seed: int, buckets: list[list[str]], **spec):
    """``tests/weight_sender.py`` as group rank 0 on ``port``: the model of ``init_seed=seed``."""
    return spawn_python(SENDER, [json.dumps({
        "model": {"max_position_embeddings": 128, "init_seed": seed}, "port": port,
        "group": GROUP, "key": KEY, "buckets": buckets, **spec})])


def join(url: str, port) -> tuple[int, dict | str]:
    """``/init_weights_update_group`` as engine rank 1 of 2 (blocks until rank 0 is there), after
    leaving any earlier group."""
    post(url, "/destroy_weights_update_group", {"group_name": GROUP})
    return post(url, "/init_weights_update_group", {
        "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
        "group_name": GROUP, "backend": "gloo"})


def version(url: str) -> str:
    return json.loads(urllib.request.urlopen(url + "/model_info").read())["weight_version"]


def storages(engine) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in engine.model.parameters()}


def model(seed: int) -> torch.nn.Module:
    return build_model(ModelConfig(max_position_embeddings=128, init_seed=seed))


def seeded(seed: int) -> dict[str, torch.Tensor]:
    return dict(model(seed).named_parameters())


@pytest.fixture  # a fresh one each test: starting it takes ~10 ms once torch is warm
def engine():
    torch.set_num_threads(1)
    e = EmbeddedEngine(MODEL, EngineConfig(max_running_requests=4), group_key=KEY).start()
    try:
        yield e
    finally:
        e.stop()


def test_weight_update_over_gloo_from_another_process(engine, spawn_python):
    """One broadcast per tensor in two buckets, while a request is aborted by the pause."""
    url, port, before = engine.url, free_port(), version(engine.url)
    target = model(11)
    names = [n for n, _ in target.named_parameters()]
    buckets = [names[: len(names) // 2], names[len(names) // 2:]]
    sender = spawn_sender(spawn_python, port, 11, buckets, load_format=None)
    assert state_checksum(engine.model) != state_checksum(target)
    with ThreadPoolExecutor(2) as pool:
        # master_port as a string: pydantic-lax like SGLang
        assert pool.submit(join, url, str(port)).result(timeout=PROCESS_START_S) == (200, {
            "success": True, "message": "Succeeded to initialize custom process group."})
        busy = pool.submit(post, url, "/generate", {"input_ids": [1, 7], "sampling_params": {
            "max_new_tokens": 120, "ignore_eos": True}})
        while not engine.scheduler.load()["num_running_reqs"] and not busy.done():
            time.sleep(0.01)
        assert post(url, "/pause_generation", {"mode": "abort"})[0] == 200
        assert busy.result()[1]["meta_info"]["weight_version"] == before
        assert post(url, "/begin_weight_update", {})[0] == 200
        params = dict(target.named_parameters())
        for i, bucket in enumerate(buckets):
            status, body = post(url, "/update_weights_from_distributed", {
                "names": bucket, "dtypes": ["float32"] * len(bucket),
                "shapes": [list(params[n].shape) for n in bucket], "group_name": GROUP,
                "weight_version": "11", "flush_cache": i == len(buckets) - 1})
            assert (status, body["success"]) == (200, True), body
        read_line(sender, "sent")
        assert post(url, "/end_weight_update", {})[0] == 200
        assert post(url, "/continue_generation", {})[0] == 200
    assert state_checksum(engine.model) == state_checksum(target)
    for (name, p), q in zip(engine.model.named_parameters(), target.parameters()):
        assert torch.equal(p, q), name
    status, info = post(url, "/generate", {"input_ids": [1, 7],
                                           "sampling_params": {"max_new_tokens": 3}})
    assert info["meta_info"]["weight_version"] == version(url) == "11"
    assert post(url, "/destroy_weights_update_group", {"group_name": GROUP}) == (200, {
        "success": True, "message": "Succeeded to destroy custom process group."})
    assert sender.wait(timeout=60) == 0


def test_standalone_engine_process(spawn_python):
    """An engine started by hand without the key serves and joins no weight group."""
    proc = spawn_python("rollout_server.engine", ["--port", "0",
                                                  "model.max_position_embeddings=128",
                                                  "rollout.engine.max_running_requests=4",
                                                  "rollout.engine.request_timeout_s=20"],
                        env={ENGINE_KEY_ENV: ""})
    url = read_line(proc, "ENGINE_URL").split()[1]
    assert urllib.request.urlopen(url + "/health", timeout=HTTP_TIMEOUT_S).status == 200
    status, out = post(url, "/generate", {"text": "7+8=",
                                          "sampling_params": {"max_new_tokens": 4,
                                                              "temperature": 0},
                                          "return_logprob": True})
    assert status == 200 and len(out["output_ids"]) <= 4
    with torch.no_grad():  # the standalone process built the same tiny model (fixed init seed)
        ids = char_tokenizer().encode("7+8=")
        ref = build_model(MODEL).generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False,
                                          eos_token_id=2, pad_token_id=0)
    assert out["output_ids"] == ref[0, len(ids):].tolist()
    metrics = urllib.request.urlopen(url + "/metrics", timeout=HTTP_TIMEOUT_S).read().decode()
    line = next(x for x in metrics.splitlines() if x.startswith("sglang:generation_tokens_total{"))
    assert 'is_streaming="false"' in line and 'tp_rank="0"' in line
    assert float(line.rsplit(" ", 1)[1]) >= len(out["output_ids"])
    # before, its door proved the group's name instead of a key (a gate of the job refused it)
    status, joined = post(url, "/init_weights_update_group", {
        "master_address": "127.0.0.1", "master_port": free_port(), "rank_offset": 1,
        "world_size": 2, "group_name": GROUP, "backend": "gloo"})
    assert (status, joined["success"]) == (400, False), joined
    assert ENGINE_KEY_ENV in joined["message"] and str(KEY_FILE) in joined["message"], joined
    proc.terminate()
    assert proc.wait(timeout=60) == 0


def plan(engine, seed: int, port: int, reform: bool = True, dtype: str = "float32"):
    """A sync of version ``seed`` from rank 0 on ``port`` in the buckets of ``specs``."""
    buckets = [BucketSpec(names=b.names, dtypes=[dtype] * len(b.names), shapes=b.shapes)
               for b in specs(engine)]
    return WeightSyncPlan(policy_version=seed, group_name=GROUP, master_addr="127.0.0.1",
                          master_port=port, world_size=2, backend="gloo", reform=reform,
                          members=[SyncMember(server_id="e", rank_offset=1)], buckets=buckets,
                          deadline_s=HTTP_TIMEOUT_S)


async def synced(engine, plan: WeightSyncPlan) -> tuple[bool, str, str]:
    """(ok, why not, the version served after) of ``apply_weight_sync``."""
    async with SGLangClient(engine.url, timeout_s=HTTP_TIMEOUT_S) as client:
        done = await apply_weight_sync(client, plan, "e")
        return done.ok, done.reason, await client.weight_version()


def test_consecutive_flattened_bucket_syncs_swap_exact_weights(engine, spawn_python):
    """The first sender dies after bucket 0: some buckets may be new, the label stays old; the
    syncs after it load exact weights."""
    ports, names, before = [free_port(), free_port()], [b.names for b in specs(engine)], \
        version(engine.url)
    assert len(names) >= 3
    crashing = spawn_sender(spawn_python, ports[0], 31, names, stop_after=1)
    ok, _, served = asyncio.run(synced(engine, plan(engine, 31, ports[0])))
    read_line(crashing, "crashing")
    assert not ok and served == before
    port = ports[1]
    sender = spawn_python(SENDER, [json.dumps({"model": {"max_position_embeddings": 128},
                                               "port": port, "group": GROUP, "key": KEY,
                                               "buckets": names, "rounds": ROUNDS})])

    async def syncs() -> list[tuple[bool, str, str, str, set[int]]]:
        out = []
        for i, r in enumerate(ROUNDS):
            done = await synced(engine, plan(engine, r["seed"], port, i == 0, r["dtype"]))
            out.append((*done, state_checksum(engine.model), storages(engine)))
        return out

    held = storages(engine)
    results = asyncio.run(syncs())
    read_line(sender, "sent")
    for r, (ok, reason, served, checksum, now) in zip(ROUNDS, results):
        assert ok and served == str(r["seed"]), reason
        target = model(r["seed"])
        if r["dtype"] == "bfloat16":  # what a bf16 wire carries: the values rounded to bf16
            with torch.no_grad():
                for p in target.parameters():
                    p.copy_(p.to(torch.bfloat16))
        assert checksum == state_checksum(target), r
        # fp32 is swapped in: received into buffers no parameter viewed; bf16 copied in place
        assert now == held if r["dtype"] == "bfloat16" else not now & held, r
        held = now
    status, out = post(engine.url, "/generate", {"input_ids": [1, 7],
                                                 "sampling_params": {"max_new_tokens": 3}})
    assert status == 200 and out["meta_info"]["weight_version"] == str(ROUNDS[-1]["seed"])


def test_a_refused_flattened_bucket_is_drained_and_loads_nothing(engine, spawn_python):
    buckets = specs(engine)
    port = free_port()
    sender = spawn_sender(spawn_python, port, 41, [b.names for b in buckets])
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    assert join(engine.url, port)[0] == 200
    # paused: buckets answered early
    assert post(engine.url, "/pause_generation", {"mode": "abort"})[0] == 200
    assert post(engine.url, "/begin_weight_update", {})[0] == 200
    # bucket 0 under a wrong name: refused after its bytes were drained
    for i, b in enumerate(buckets):
        last = i == len(buckets) - 1
        status, body = post(engine.url, "/update_weights_from_distributed", {
            "names": ["bogus." + n for n in b.names] if i == 0 else b.names,
            "dtypes": b.dtypes, "shapes": b.shapes,
            "group_name": GROUP, "load_format": "flattened_bucket", "flush_cache": last,
            **({"weight_version": "41"} if last else {})})
        assert (status, body["success"]) == ((400, False) if i == 0 else (200, True)), body
    assert post(engine.url, "/end_weight_update", {})[0] == 200
    assert post(engine.url, "/continue_generation", {})[0] == 200
    read_line(sender, "sent")
    target = seeded(41)
    for n, p in engine.model.named_parameters():
        assert torch.equal(p, before[n] if n in buckets[0].names else target[n]), n


def test_an_unlabelled_last_bucket_is_settled_before_end_weight_update_answers(
        engine, spawn_python, tmp_path):
    """/end_weight_update reports a failed unlabelled last bucket, or it is loaded."""
    bucket = specs(engine)[0]
    body = {"names": bucket.names, "dtypes": bucket.dtypes, "shapes": bucket.shapes,
            "group_name": GROUP, "load_format": "flattened_bucket", "flush_cache": False}
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}

    def session(seed: int, go: Path, **spec) -> tuple[tuple, tuple, object]:
        port = free_port()
        sender = spawn_sender(spawn_python, port, seed, [bucket.names], wait_for=str(go), **spec)
        assert join(engine.url, port)[0] == 200
        # as the rollout server does
        assert post(engine.url, "/pause_generation", {"mode": "abort"})[0] == 200
        assert post(engine.url, "/begin_weight_update", {})[0] == 200
        update = post(engine.url, "/update_weights_from_distributed", body)
        go.touch()  # only now does the sender broadcast (or crash)
        end = post(engine.url, "/end_weight_update", {})
        assert post(engine.url, "/continue_generation", {})[0] == 200
        return update, end, sender

    update, end, crashed = session(51, tmp_path / "go1", stop_after=0)
    read_line(crashed, "crashing")
    assert update[0] == 200, update  # answered once its receive was posted
    assert end[0] == 400 and not end[1]["success"], end  # the bucket never arrived: no "Success"
    for n, p in engine.model.named_parameters():
        assert torch.equal(p, before[n]), n
    update, end, sender = session(52, tmp_path / "go2")
    assert update[0] == 200 and end[0] == 200, (update, end)
    target = seeded(52)
    # read right after end answered: the bucket is loaded
    for n, p in engine.model.named_parameters():
        assert torch.equal(p, target[n] if n in bucket.names else before[n]), n
    read_line(sender, "sent")
    assert post(engine.url, "/end_weight_update", {})[0] == 400  # the session is closed


def test_an_update_while_not_paused_holds_new_requests_until_its_bucket_is_loaded(
        engine, spawn_python, tmp_path):
    first, before = specs(engine)[0], version(engine.url)
    port, go = free_port(), tmp_path / "go"
    sender = spawn_sender(spawn_python, port, 81, [first.names], wait_for=str(go))
    # what the engine holds once bucket 0 is in: bucket 0 new, the rest as it was
    mixed, new = build_model(MODEL), seeded(81)
    with torch.no_grad():
        for (n, p), now in zip(mixed.named_parameters(), engine.model.parameters()):
            p.copy_(new[n] if n in first.names else now)
    prompt = [1, 40, 41, 42]
    body = {"names": first.names, "dtypes": first.dtypes, "shapes": first.shapes,
            "group_name": GROUP, "load_format": "flattened_bucket", "flush_cache": False}
    assert join(engine.url, port)[0] == 200
    with ThreadPoolExecutor(2) as pool:
        assert post(engine.url, "/begin_weight_update", {})[0] == 200
        update = pool.submit(post, engine.url, "/update_weights_from_distributed", body)
        try:
            # the update reaches the engine (or is answered) first
            wait_deadline = time.monotonic() + 1.0
            while not update.done() and time.monotonic() < wait_deadline:
                time.sleep(0.01)
            request = pool.submit(post, engine.url, "/generate", {
                "input_ids": prompt,
                "sampling_params": {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}})
            # bounded look: the request must not start before bucket 0 arrived
            window = time.monotonic() + 2.0
            started = False
            while time.monotonic() < window and not started:
                started = request.done() or engine.scheduler.load()["num_running_reqs"] > 0
                time.sleep(0.01)
        finally:
            go.touch()
        assert not started, "a /generate started while the update's bucket was still on the wire"
        assert update.result(timeout=HTTP_TIMEOUT_S)[0] == 200
        status, out = request.result(timeout=HTTP_TIMEOUT_S)
    assert post(engine.url, "/end_weight_update", {})[0] == 200
    assert status == 200 and out["meta_info"]["weight_version"] == before
    with torch.no_grad():
        ref = mixed.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    assert out["output_ids"] == ref[0, len(prompt):].tolist()
    read_line(sender, "sent")
