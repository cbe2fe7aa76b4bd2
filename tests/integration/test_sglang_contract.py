"""Contract test against SGLang 0.5.23's own types, without installing it (the main suite's).

The wheel (pip download --no-deps, cached in ~/.cache/areal_like/sglang) gives api_types.py,
exec'd to decode every /generate, /abort_request body and engine response, and io_struct.py,
parsed to check every control body's fields, required keys, Literals and JSON types; captured via
SGLangClient(on_request, on_response) over a full cycle with a broadcast weight update. Skips only
when the wheel cannot be downloaded; tests/sglang/test_sglang_contract_live.py runs the same checks
against the real server.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import types
import zipfile
from pathlib import Path

import pytest

from areal_like.engines.client import EngineError
from areal_like.engines.sglang import SGLangClient
from areal_like.net.distributed import free_port
from areal_like.net.metrics import scrape
from areal_like.settings.config import EngineConfig, ModelConfig
from areal_like.weights.plan import BucketSpec, SyncMember, WeightSyncPlan
from areal_like.weights.push import apply_weight_sync
from areal_like.weights.server_sync import local_door

SGLANG_PIN = "0.5.23"
CACHE = Path(os.environ.get("AREAL_LIKE_CACHE", Path.home() / ".cache" / "areal_like")) / "sglang"
REPO = Path(__file__).resolve().parents[2]
MODEL = {"max_position_embeddings": 4096}  # room for long generations to pause and abort mid-way
LONG = 3000

# control endpoint -> (request struct, response struct) in io_struct.py
CONTROL = {
    "/pause_generation": ("PauseGenerationReqInput", None),
    "/continue_generation": ("ContinueGenerationReqInput", None),
    "/init_weights_update_group": ("InitWeightsUpdateGroupReqInput",
                                   "InitWeightsUpdateGroupReqOutput"),
    "/destroy_weights_update_group": ("DestroyWeightsUpdateGroupReqInput",
                                      "DestroyWeightsUpdateGroupReqOutput"),
    "/update_weights_from_distributed": ("UpdateWeightsFromDistributedReqInput",
                                         "UpdateWeightsFromDistributedReqOutput"),
    "/begin_weight_update": ("BeginWeightUpdateReqInput", "BeginWeightUpdateReqOutput"),
    "/end_weight_update": ("EndWeightUpdateReqInput", "EndWeightUpdateReqOutput"),
    "/update_weights_from_disk": ("UpdateWeightFromDiskReqInput", "UpdateWeightFromDiskReqOutput"),
    "/abort_request": ("AbortReq", None),
}

SENDER = (Path(__file__).resolve().parents[1] / "weight_sender.py").read_text()  # group rank 0
GROUP_KEY = secrets.token_hex(16)  # the job's engine key: the sender's gate asks, a door proves


# ---------------------------------------------------------------------------- SGLang's contract
def sglang_wheel() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    found = sorted(CACHE.glob(f"sglang-{SGLANG_PIN}-*.whl"))
    if found:
        return found[0]
    # concurrent runs: download aside, then rename
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                            f"sglang=={SGLANG_PIN}",
                            "-d", tmp], capture_output=True, text=True, timeout=600)
        wheels = sorted(Path(tmp).glob("sglang-*.whl"))
        if r.returncode != 0 or not wheels:
            pytest.skip("cannot download the pinned SGLang wheel "
                        f"(pip download --no-deps sglang=={SGLANG_PIN} "
                        f"failed: {(r.stderr or r.stdout).strip()[-300:]})")
        target = CACHE / wheels[0].name
        os.replace(wheels[0], target)
        return target


API_TYPES, IO_STRUCT = "sglang/api/v1/api_types.py", "sglang/srt/managers/io_struct.py"


@pytest.fixture(scope="module")
def contract():
    with zipfile.ZipFile(sglang_wheel()) as z:
        return contract_of(z.read(API_TYPES).decode(), z.read(IO_STRUCT).decode())


def contract_of(api_src: str, io_src: str):
    """SGLang's contract from the sources of its two modules: (api_types module, io_structs)."""
    api = types.ModuleType("sglang_api_types_pinned")
    sys.modules[api.__name__] = api
    exec(compile(api_src, API_TYPES, "exec"), api.__dict__)
    return api, io_structs(io_src)


def io_structs(source: str) -> dict[str, dict[str, tuple[ast.expr, bool]]]:
    """class name -> {field: (annotation AST, has_default)}, inherited fields included."""
    classes = {n.name: n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)}

    def fields(name: str) -> dict:
        node = classes[name]
        out: dict = {}
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                out.update(fields(base.id))
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                out[stmt.target.id] = (stmt.annotation, stmt.value is not None)
        return out
    return {name: fields(name) for name in classes}


def json_matches(value, ann: ast.expr) -> bool:
    """Does a JSON value fit a (simple) io_struct annotation? Unknown annotations accept."""
    if isinstance(ann, ast.Name):
        expected = {"str": (str,), "int": (int,), "bool": (bool,),
                    "float": (int, float)}.get(ann.id)
        if expected is None:
            return True
        return isinstance(value, expected) and (ann.id == "bool" or not isinstance(value, bool))
    if isinstance(ann, ast.Subscript) and isinstance(ann.value, ast.Name):
        head, arg = ann.value.id, ann.slice
        if head == "Optional":
            return value is None or json_matches(value, arg)
        if head == "List":
            return isinstance(value, list) and all(json_matches(v, arg) for v in value)
        if head == "Literal":
            allowed = [e.value for e in (arg.elts if isinstance(arg, ast.Tuple) else [arg])]
            return value in allowed
    return True


def check_control_body(structs, path: str, body) -> None:
    fields = structs[CONTROL[path][0]]
    body = body or {}
    assert set(body) <= set(fields), (
        f"{path}: fields {set(body) - set(fields)} are not in {CONTROL[path][0]}")
    missing = [f for f, (_, has_default) in fields.items() if not has_default and f not in body]
    assert not missing, f"{path}: required fields {missing} missing"
    for key, value in body.items():
        assert json_matches(value, fields[key][0]), (
            f"{path}: {key}={value!r} does not fit {ast.unparse(fields[key][0])}")


# ---------------------------------------------------------------------------- the engine under test
async def drive_engine(url: str, tmp: Path, seen_requests: list, seen_responses: list,
                       plan: WeightSyncPlan, sender: subprocess.Popen, api_key: str | None = None,
                       door: bool = False) -> dict:
    """Exercise every endpoint the rollout server uses; door: join through a store door."""
    client = SGLangClient(url, api_key=api_key, timeout_s=120,
                          on_request=lambda m, p, b: seen_requests.append((p, b)),
                          on_response=lambda m, p, s, j, raw: seen_responses.append((p, s, j, raw)))
    facts: dict = {}
    try:
        await client.wait_healthy(120)
        await client.health_generate()  # EngineError when it does not generate
        info = await client.model_info()
        await client.server_info()
        facts["version0"] = info.get("weight_version")
        sp = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 0.9, "top_k": 20,
              "stop_token_ids": [2]}
        facts["single"] = await client.generate([1, 20, 21, 22], sp, rid="contract-1")
        facts["greedy_length"] = await client.generate([1, 30], {"max_new_tokens": 3,
                                                                 "temperature": 0.0,
                                                                 "ignore_eos": True})
        facts["stopped"] = await client.generate([1, 31], {"max_new_tokens": 3,
                                                           "stop_token_ids": list(range(104))})
        facts["episode"] = await one_episode(client)  # the exact bodies a rollout server sends
        # a long request aborted by pause (interruptible generation) and by abort_request
        long_sp = {"max_new_tokens": LONG, "temperature": 1.0, "ignore_eos": True}
        job = asyncio.create_task(client.generate([1, 40, 41], long_sp))
        await generating(client)
        await client.pause_generation("abort")
        facts["paused"] = await job
        await client.continue_generation()
        job = asyncio.create_task(client.generate([1, 42], long_sp, rid="to-abort"))
        await generating(client)
        await client.abort_request("to-abort")
        facts["aborted"] = await job
        await client.abort_request(abort_all=True)
        # a malformed request gets SGLang's 400 contract error
        with pytest.raises(EngineError) as e:
            await client.generate([1, 5], {"max_new_tokens": 2, "bogus": 1})
        facts["bad_status"] = e.value.status
        # weight update by broadcast from a sender process, driven by a plan
        facts["sync"] = await sync_from_sender(client, plan, sender, door)
        facts["version1"] = await client.weight_version()
        # update from disk
        from areal_like.weights.hf import build_model
        model_dir = tmp / "model-v2"
        build_model(ModelConfig(**MODEL, init_seed=2)).save_pretrained(model_dir)
        await client.update_weights_from_disk(str(model_dir), weight_version="2")
        facts["version2"] = await client.weight_version()
        facts["metrics"] = await asyncio.to_thread(scrape, f"{url}/metrics", 30.0, api_key)
    finally:
        await client.close()
    return facts


async def one_episode(client: SGLangClient):
    from areal_like.settings.config import TaskConfig
    from areal_like.tasks.task import make_task
    from areal_like.tasks.tokenizer import char_tokenizer
    from areal_like.wire.protocol import Credit
    from rollout_server.episode import EpisodeContext, run_episode
    from rollout_server.reward_pool import RewardPool

    task_cfg = TaskConfig(group_size=2, max_new_tokens=8)
    task = make_task(task_cfg)
    rewards = RewardPool(task_cfg, task.reward_path)
    ctx = EpisodeContext(client=client, task=task, tokenizer=char_tokenizer(), rewards=rewards,
                         task_cfg=task_cfg, server_id="contract", current_version_fn=lambda: 0)
    try:
        return await run_episode(ctx, Credit(lease_id="L1", prompt_index=3, epoch=0,
                                             deadline_s=60.0))
    finally:
        rewards.close()


async def generating(client: SGLangClient, timeout_s: float = 60.0) -> None:
    """Wait until the engine holds 8 more KV slots: the long request is decoding."""
    async def used() -> int:
        return sum(int(x.get("num_used_tokens") or 0) for x in await client.loads())
    start, deadline = await used(), time.monotonic() + timeout_s
    while await used() < start + 8:
        assert time.monotonic() < deadline, f"no long request decoding within {timeout_s:.0f}s"
        await asyncio.sleep(0.01)


def weight_sync_setup(model: dict = MODEL, member: str = "contract", state: dict | None = None,
                      state_file: Path | None = None) -> tuple[WeightSyncPlan, subprocess.Popen]:
    """The v1 plan for ``member`` and the sender process (rank 0), started before the engine:
    ``state`` (default: the weights of ``model`` at init_seed 1) in two buckets, read from
    ``state_file`` when given (e.g. an adapter alone). The sender prints ``ready``, then waits in
    the rendezvous; its group key is ``GROUP_KEY``."""
    from areal_like.weights.hf import build_model

    if state is None:
        state = build_model(ModelConfig(**model, init_seed=1)).state_dict()
    names = list(state)
    buckets = [names[: len(names) // 2], names[len(names) // 2:]]
    port, group = free_port(), "contract_weights"
    plan = WeightSyncPlan(
        policy_version=1, group_name=group, master_addr="127.0.0.1", master_port=port, world_size=2,
        backend="gloo", reform=True, members=[SyncMember(server_id=member, rank_offset=1)],
        buckets=[BucketSpec(names=b, dtypes=[str(state[n].dtype).removeprefix("torch.") for n in b],
                            shapes=[list(state[n].shape) for n in b]) for b in buckets],
        deadline_s=120.0)
    spec = {"model": {**model, "init_seed": 1}, "port": port, "group": group, "buckets": buckets,
            "key": GROUP_KEY}
    if state_file is not None:
        import torch

        torch.save(state, state_file)
        spec["state_file"] = str(state_file)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    sender = subprocess.Popen([sys.executable, "-c", SENDER, json.dumps(spec)], env=env,
                              stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    return plan, sender


async def sync_from_sender(client: SGLangClient, plan: WeightSyncPlan, sender: subprocess.Popen,
                           door: bool = False):
    opened = local_door(client.base_url, GROUP_KEY) if door else None
    done = await apply_weight_sync(client, plan, "contract", door=opened)
    _, err = await asyncio.to_thread(sender.communicate, timeout=120)
    assert sender.returncode == 0, err[-2000:]
    return done


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    from rollout_server.engine import EmbeddedEngine

    tmp = tmp_path_factory.mktemp("contract")
    plan, sender = weight_sync_setup()
    requests: list = []
    responses: list = []
    try:
        engine = EmbeddedEngine(ModelConfig(**MODEL), EngineConfig(max_running_requests=8),
                                group_key=GROUP_KEY).start()
        try:
            facts = asyncio.run(drive_engine(engine.url, tmp, requests, responses, plan, sender))
        finally:
            engine.stop()
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    return requests, responses, facts


# ---------------------------------------------------------------------------- the tests
def test_what_we_send_fits_sglangs_types_and_what_the_engine_answers_decodes_with_them(
        contract, engine_run):
    requests, responses, facts = engine_run
    check_generate_and_abort_requests(*contract, requests)
    check_control_requests(contract[1], requests)
    check_responses(*contract, responses, facts)
    check_facts(facts)


# ------------------------------------------------------------ the checks (also tests/sglang's)
def check_generate_and_abort_requests(api, structs, requests: list) -> None:
    generate = [b for p, b in requests if p == "/generate"]
    assert len(generate) >= 6
    for body in generate:
        if "bogus" in json.dumps(body):
            with pytest.raises(api.JsonContractError, match="unknown field `bogus`"):
                api.GenerateRequest.from_json_value(body)
            continue
        req = api.GenerateRequest.from_json_value(body)
        assert req.input_ids == body["input_ids"] and req.return_logprob is True
    for body in [b for p, b in requests if p == "/abort_request"]:
        api.AbortRequest.from_json_value(body)
        check_control_body(structs, "/abort_request", body)


def check_control_requests(structs, requests: list) -> None:
    sent = {p for p, _ in requests}
    for path in CONTROL:
        assert path in sent, f"the client never exercised {path}"
    for path, body in requests:
        if path in CONTROL:
            check_control_body(structs, path, body)
    pause = [b for p, b in requests if p == "/pause_generation"]
    assert all(b["mode"] == "abort" for b in pause)


def check_responses(api, structs, responses: list, facts: dict) -> None:
    finish_types = set()
    for path, status, body, raw in responses:
        if path == "/generate" and status == 200:
            for obj in body if isinstance(body, list) else [body]:
                resp = api.GenerateResponse.from_json_value(obj)
                fr = resp.meta_info.finish_reason
                assert isinstance(fr, (api.FinishStop, api.FinishLength, api.FinishAbort)), fr
                finish_types.add(type(fr).__name__)
                assert resp.meta_info.weight_version is not None
                assert len(resp.meta_info.output_token_logprobs) == len(resp.output_ids)
                assert [e.token_id for e in resp.meta_info.output_token_logprobs] == resp.output_ids
        elif path == "/generate":
            assert status == 400 and isinstance(body, dict) and "error" in body, (status, raw)
        elif path == "/model_info":
            api.GetModelInfoResponse.from_json_value(body)
        elif path == "/server_info":
            api.GetServerInfoResponse.from_json_value(body)
        elif path == "/abort_request":
            assert status == 200 and raw == "", raw
        elif path in CONTROL and CONTROL[path][1] and status == 200:
            out_fields = structs[CONTROL[path][1]]
            assert (isinstance(body, dict)
                    and {"success", "message"} <= set(body) <= set(out_fields)), body
    assert finish_types == {"FinishStop", "FinishLength", "FinishAbort"}, finish_types
    assert facts["bad_status"] == 400


def check_facts(f: dict, first_version: str | None = "0") -> None:
    """``first_version``: the version the engine served first (None: any number)."""
    assert f["single"].finish_reason in ("stop", "length") and 1 <= len(f["single"].output_ids) <= 6
    assert f["greedy_length"].finish_reason == "length" and len(f["greedy_length"].output_ids) == 3
    assert f["stopped"].finish_reason == "stop" and len(f["stopped"].output_ids) == 1
    group = f["episode"]
    assert (group.group_id == "contract-L1" and group.prompt_index == 3
            and len(group.trajectories) == 2)
    for t in group.trajectories:
        assert (1 <= len(t.output_ids) <= 8 and t.finish_reason in ("stop", "length")
                and set(t.versions) == {0})
    for key in ("paused", "aborted"):
        assert f[key].finish_reason == "abort" and len(f[key].output_ids) < LONG, key
    assert f["sync"].ok, f["sync"].reason
    assert f["version0"] == first_version if first_version is not None else f["version0"].isdigit()
    assert (f["version1"], f["version2"]) == ("1", "2")
    names = {k.split("{")[0] for k in f["metrics"]}
    assert {"sglang:num_running_reqs", "sglang:generation_tokens_total",
            "sglang:num_requests_total"} <= names
