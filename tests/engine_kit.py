"""What the real-engine tiers (tests/sglang, tests/vllm) share: the model they serve, its prompts
and tolerance, the check that an engine's log-probs are the trainer's, a push from a stand-in
trainer (``push_seed``), the check of the engine as a distillation teacher (``check_teacher``),
the LoRA tests' adapter model, disk-path push and guard check (``lora_model``, ``sync_adapter``,
``scored``, ``check_guard_probes_the_live_adapter``),
the routing replay checks
(``routed_generations``, ``assert_routed_as_the_model``, ``run_routing_replay_job``) and the
faults (``check_killed_server_takes_its_engine``, ``check_killed_engine_is_relaunched``). Each
tier's kit (``sglang_kit``, ``vllm_kit``) adds its engine's flags and how to start one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from areal_like.net.distributed import free_port
from areal_like.settings.config import LoraConfig, ModelConfig, WeightSyncConfig
from areal_like.weights.hf import build_model
from areal_like.weights.lora import add_adapters
from areal_like.weights.plan import BucketSpec, SyncMember, WeightSyncPlan
from areal_like.weights.push import apply_weight_sync
from areal_like.weights.server_sync import apply_adapter_sync, local_door
from areal_like.wire.weight_wire import FLATTENED
from rollout_server.engine_reaper import group_members, shm_files
from tests.conftest import port_free, wait_until
from trainer.logprob_guard import trainer_logprobs
from trainer.weight_buckets import PushTensors
from trainer.weight_local import DiskSender
from trainer.weight_sync import SyncReport, push_buckets

REPO = Path(__file__).resolve().parents[1]
# The quickstart's tiny Qwen2 (configs/model/tiny.yaml, char tokenizer), room for long generations.
MODEL = dict(
    vocab_size=104,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    dtype="float32",
)

PROMPTS = [[1, 20, 21, 22, 23], [1, 40, 41], [1, 60, 61, 62, 63, 64, 65]]
TOL = 1e-4  # float32 on both sides; the engine's CPU attention vs transformers' sdpa


def model_config(path: Path | str | None = None, **over) -> ModelConfig:
    return ModelConfig(**{**MODEL, **over}, path=str(path) if path else None)


def save_model(path: Path, init_seed: int = 0) -> Path:
    """A Hugging Face directory of the tiny model built with ``init_seed``, char tokenizer."""
    from areal_like.tasks.tokenizer import char_tokenizer
    from areal_like.weights.hf import build_model

    build_model(model_config(init_seed=init_seed)).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@dataclass
class Server:
    proc: object  # the engine's process (rollout_server.engine_process.EngineProcess)
    model_dir: Path
    api_key: str

    @property
    def url(self) -> str:
        return self.proc.url


def start(process_class, engine, model_dir: Path, log_path: Path, api_key: str | None = None
          ) -> Server:
    """An engine of ``process_class`` serving ``model_dir`` with ``engine``'s flags and ``api_key``,
    else a fresh key (hex: never starts with "-", launch_sglang.write_secrets)."""
    key = api_key or secrets.token_hex(16)
    proc = process_class(model_config(model_dir), engine, log_path=str(log_path), api_key=key)
    return Server(proc=proc.start(), model_dir=model_dir, api_key=key)


async def engine_logprobs(client, temperature: float, tokens: int = 24) -> list:
    """The engine's generations for ``PROMPTS`` (``tokens`` each, at ``temperature``)."""
    sp = {"max_new_tokens": tokens, "temperature": temperature, "top_p": 1.0, "top_k": -1,
          "ignore_eos": True}
    return [await client.generate(p, sp) for p in PROMPTS]


def assert_served(outs, model, temperature: float) -> None:
    """Every sampled token's engine log-prob is the trainer's for ``model`` at ``temperature``."""
    for prompt, out in zip(PROMPTS, outs):
        assert out.output_ids, f"no token for prompt {prompt}"
        mine = trainer_logprobs(model, prompt, out.output_ids, temperature, torch.device("cpu"))
        worst = max(abs(a - b) for a, b in zip(out.logprobs, mine))
        assert worst < TOL, f"engine and trainer differ by {worst:.2e} (prompt {prompt})"


def seed_plan(version: int, state: dict, port: int, group: str, path: str = "distributed",
              payloads=(), engine_ranks: int = 1, deadline_s: float = 300) -> WeightSyncPlan:
    """A plan pushing ``state`` as ``version`` in two buckets to one member, server "s"."""
    names = list(state)
    buckets = [BucketSpec(names=b, dtypes=["float32"] * len(b),
                          shapes=[list(state[n].shape) for n in b])
               for b in (names[:len(names) // 2], names[len(names) // 2:])]
    return WeightSyncPlan(
        policy_version=version, group_name=group, master_addr="127.0.0.1", master_port=port,
        world_size=1 + engine_ranks, backend="gloo", reform=True,
        members=[SyncMember(server_id="s", rank_offset=1)], path=path, payloads=list(payloads),
        buckets=buckets, deadline_s=deadline_s)


async def push_seed(client, version: int, seed: int, load_format: str | None = FLATTENED,
                    pause_mode: str = "abort", engine_ranks: int = 1, wait_ready: bool = False
                    ) -> None:
    """Broadcast the tiers' model built with ``seed`` as ``version`` from a sender process (group
    rank 0, tests/weight_sender.py, as the trainer) to the engine of ``engine_ranks`` (its
    tp_size) behind ``client``, the rollout server's side through ``apply_weight_sync``: at once
    (the engine pauses while the sender starts), or once the sender's model is built."""
    state = build_model(model_config(init_seed=seed)).state_dict()
    port, group = free_port(), f"engine_tier_{version}_{seed}_{os.getpid()}"
    plan = seed_plan(version, state, port, group, engine_ranks=engine_ranks)
    spec = {"model": {**MODEL, "init_seed": seed}, "world_size": 1 + engine_ranks, "port": port,
            "group": group, "load_format": load_format, "buckets": [b.names for b in plan.buckets],
            "backend": "gloo", "timeout_s": 300, "key": client.api_key}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    sender = subprocess.Popen([sys.executable, "-c", (REPO / "tests/weight_sender.py").read_text(),
                               json.dumps(spec)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        if wait_ready:
            assert await asyncio.to_thread(sender.stdout.readline) == "ready\n"
        done = await apply_weight_sync(client, plan, "s", load_format=load_format,
                                       door=local_door(client.base_url, client.api_key),
                                       pause_mode=pause_mode)
        _, err = await asyncio.to_thread(sender.communicate, timeout=300)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    assert done.ok, done.reason
    assert sender.returncode == 0, err[-2000:]
    assert await client.weight_version() == str(version)


def lora_model(lora: LoraConfig, seed: int | None, base: ModelConfig | None = None
               ) -> torch.nn.Module:
    """``base`` (default: the tiers' model, init seed 0) with ``lora``'s adapters: B from ``seed``
    (None: PEFT's zero B, the base itself), as a trained adapter would be."""
    model = add_adapters(build_model(base or model_config(init_seed=0)), lora)
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


async def sync_adapter(client, model, version: int, pause_mode: str = "abort") -> str:
    """What a push of ``model`` as ``version`` gives a rollout server: the trainer's disk path
    (the adapter alone, staged and routed as ``WeightBroadcaster.push`` does), then the server's
    side of it; the directory is gone before the engine samples (the engine holds its own copy).
    Returns the plan's id."""
    params = PushTensors(model)
    buckets = push_buckets(params, "float32", bucket_mb=0.01)  # WeightBroadcaster.push's
    sender = DiskSender(WeightSyncConfig(path="disk"), "gloo", 0, "float32")
    sender.stage(model, params, buckets, SyncReport(version=version))
    try:
        plan = WeightSyncPlan(policy_version=version, buckets=buckets, backend="gloo",
                              plan_id=uuid.uuid4().hex[:12],
                              deadline_s=300, **sender.route(version, [("s", 1)]))
        assert len(buckets) == len(plan.payloads) == 1  # the whole adapter, bucket_mb or not
        done = await apply_adapter_sync(client, plan, "s", pause_mode=pause_mode)
    finally:
        sender.done()
        sender.close()
    assert not os.path.exists(plan.payloads[0])
    assert done.ok, done.reason
    assert await client.weight_version() == str(version)
    return plan.plan_id


def scored(outs, model, temperature: float) -> float:
    """The largest difference between the engine's log-probs for PROMPTS and ``model``'s."""
    return max(abs(a - b) for prompt, out in zip(PROMPTS, outs)
               for a, b in zip(out.logprobs, trainer_logprobs(model, prompt, out.output_ids,
                                                              temperature, torch.device("cpu"))))


def check_guard_probes_the_live_adapter(server: Server, lora: LoraConfig, kind: str) -> None:
    """The log-prob guard's probe names the live adapter as the job's generate calls do
    (``served_name`` of the push's version and plan) and so measures the trainer's model with that
    adapter within the guard's default tolerance; unnamed, the engine answers with the base model
    (that probe would refuse a correct job)."""
    from areal_like.engines import engine_client
    from areal_like.tasks.tokenizer import load_tokenizer
    from areal_like.weights.lora import served_name
    from trainer.logprob_guard import PROBE_TEXT, compare_logprobs, probe_engine

    base, trained = lora_model(lora, None), lora_model(lora, 5)
    prompt = list(load_tokenizer(model_config(server.model_dir)).encode(PROBE_TEXT))

    def mean_off(probe, model) -> float:
        mine = trainer_logprobs(model, prompt, probe.output_ids, 1.0, torch.device("cpu"))
        return compare_logprobs(probe.engine_logp, mine)[0]

    async def push() -> str:
        async with engine_client(kind, server.url, api_key=server.api_key, timeout_s=300) as client:
            return await sync_adapter(client, trained, 7)

    plan_id = asyncio.run(push())
    named = probe_engine("s", server.url, prompt, 1.0, api_key=server.api_key,
                         adapter=served_name(7, plan_id), engine_kind=kind)
    assert mean_off(named, trained) < 0.05 < mean_off(named, base)  # 0.05: the guard's default
    unnamed = probe_engine("s", server.url, prompt, 1.0, api_key=server.api_key, engine_kind=kind)
    assert mean_off(unnamed, base) < 0.05 < mean_off(unnamed, trained)


def hf_logprobs(model_dir: Path, ids: list[int], start: int) -> list[float]:
    """log_softmax(logits)[token] of ``ids[start:]`` from one plain transformers forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return [float(logp[t - 1, ids[t]]) for t in range(start, len(ids))]


def check_teacher(url: str, api_key: str, model_dir: Path, kind: str) -> None:
    """The engine at ``url`` (of ``distill.teacher_engine=kind``, serving ``model_dir``) as a
    distillation teacher: the input log-probs its client returns equal a direct forward of its
    model (within ``TOL``: float32 on both sides), from any start; and a group generated by it
    with it as the teacher carries them on each trajectory: the forward's, and (the student is
    the teacher here) its behaviour log-probs."""
    import asyncio

    from areal_like.engines import engine_client
    from areal_like.settings.config import TaskConfig
    from areal_like.settings.distill_schema import DistillConfig
    from areal_like.tasks.task import make_task
    from areal_like.tasks.tokenizer import char_tokenizer
    from areal_like.wire.protocol import Credit
    from rollout_server.episode import EpisodeContext, run_episode
    from rollout_server.reward_pool import RewardPool
    from rollout_server.teacher import Teacher

    rows = [p + [30 + i, 31, 32 + i] for i, p in enumerate(PROMPTS)]
    starts = [1, len(PROMPTS[1]), len(rows[2]) - 1]
    task_cfg = TaskConfig(group_size=2, max_new_tokens=8, temperature=1.0)
    task = make_task(task_cfg)
    rewards = RewardPool(task_cfg, task.reward_path)

    async def go():
        client = engine_client(kind, url, api_key=api_key)
        teacher = Teacher(DistillConfig(teachers=[url], teacher_engine=kind), url,
                          api_key=api_key)
        ctx = EpisodeContext(client=client, task=task, tokenizer=char_tokenizer(),
                             rewards=rewards, task_cfg=task_cfg, server_id="teach",
                             current_version_fn=lambda: 0, teachers=[teacher])
        try:
            return (await client.input_logprobs(rows, starts),
                    await run_episode(ctx, Credit(lease_id="L1", prompt_index=3, epoch=0,
                                                  deadline_s=60.0)))
        finally:
            await client.close()
            await teacher.client.close()

    try:
        got, group = asyncio.run(go())
    finally:
        rewards.close()
    for row, start, values in zip(rows, starts, got):
        want = hf_logprobs(model_dir, row, start)
        assert len(values) == len(want) == len(row) - start
        worst = max(abs(a - b) for a, b in zip(values, want))
        assert worst < TOL, f"teacher and forward differ by {worst:.2e} (row {row}, from {start})"
    for t in group.trajectories:
        out = [int(x) for x in t.output_ids]
        assert out and t.teacher_logp is not None and len(t.teacher_logp) == len(out)
        want = hf_logprobs(model_dir, [int(x) for x in t.prompt_ids] + out,
                           len(t.prompt_ids))
        assert max(abs(float(a) - b) for a, b in zip(t.teacher_logp, want)) < TOL
        assert max(abs(float(a) - float(b)) for a, b in zip(t.teacher_logp, t.behav_logp)) < TOL


def check_teacher_process(model_dir: Path, kind: str, log_path: Path) -> None:
    """The job's teacher process for ``model_dir`` on ``distill.teacher_engine=kind`` (the tier's
    topology flags, the job's key from the environment), as ``areal-like run`` starts it: it says
    its URL once its engine is healthy, scores as ``check_teacher`` checks, and on SIGTERM stops
    its engine and exits 0, leaving no process of its group."""
    import signal
    import subprocess
    import sys
    import threading
    import time

    import psutil

    from areal_like.net.auth import ENGINE_KEY_ENV
    from areal_like.net.distributed import free_port
    from areal_like.settings.config import load_config
    from launch.topology import teacher_overrides

    job = [f"topology=cpu_{kind}", f"distill.teachers=[{model_dir}]", "task.temperature=1.0",
           f"distill.teacher_engine={kind}", f"run_dir={log_path.parent}"]
    argv = [sys.executable, "-m", "rollout_server.engine", *job,
            *teacher_overrides(str(model_dir), load_config(job).distill),
            "--host", "127.0.0.1", "--port", str(free_port("127.0.0.1"))]
    key = secrets.token_hex(16)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, ENGINE_KEY_ENV: key,
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, env=env, cwd=root,
                                start_new_session=True)
    said = threading.Event()
    lines: list[str] = []

    def read():
        for line in proc.stdout:
            lines.append(line.decode().strip())
            if lines[-1].startswith("ENGINE_URL "):
                said.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + 600
        while not said.wait(1.0):
            assert proc.poll() is None, f"teacher process exited {proc.returncode} ({log_path})"
            assert time.monotonic() < deadline, f"no ENGINE_URL in 600 s ({log_path})"
        url = next(ln for ln in lines if ln.startswith("ENGINE_URL ")).split()[1]
        kids = psutil.Process(proc.pid).children(recursive=True)
        launched = {"sglang": "sglang.launch_server", "vllm": "vllm.entrypoints"}[kind]
        assert any(launched in " ".join(c.cmdline()) for c in kids), "no engine of its kind"
        group = [proc.pid, *(c.pid for c in kids)]
        check_teacher(url, key, model_dir, kind)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    assert code == 0, f"teacher process exited {code} on SIGTERM ({log_path})"
    left = [p for p in group if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert not left, f"left running: {left}"


async def routed_generations(client, tokens: int = 16) -> list[tuple[list[int], object]]:
    """(input, generation) pairs with their routes: the engine's generations for ``PROMPTS``
    (``tokens`` each, sampled), then a second turn of each: its conversation so far and three
    context tokens, a prefix the engine may serve from its cache."""
    sp = {"max_new_tokens": tokens, "temperature": 1.0, "top_p": 1.0, "top_k": -1,
          "ignore_eos": True}
    first = [(p, await client.generate(p, sp)) for p in PROMPTS]
    turns = [p + out.output_ids + [30, 31, 32] for p, out in first]
    return first + [(t, await client.generate(t, sp)) for t in turns]


def assert_routed_as_the_model(pairs, model_dir: Path) -> None:
    """Each generation's routes are the experts a transformers forward of ``model_dir`` routes the
    same tokens to: every token the engine ran through the model (all but the last sampled one,
    a cached prefix included), every layer, in top-k order (both sides take torch.topk of the same
    fp32 router logits)."""
    import numpy as np

    from areal_like.weights.routing import recording

    model = build_model(ModelConfig(path=str(model_dir), dtype="float32",
                                    attn_implementation="sdpa")).eval()
    for ids, out in pairs:
        assert out.output_ids and out.routed_experts is not None, f"no routes for {ids}"
        with torch.no_grad(), recording(model) as routes:
            model(torch.tensor([list(ids) + out.output_ids[:-1]]))
        want = routes[0].numpy()  # [tokens, layers, top_k]
        got = np.frombuffer(out.routed_experts, "<i4")
        assert got.size == want.size, (len(ids), got.size, want.shape)
        np.testing.assert_array_equal(got.reshape(want.shape), want)


def run_routing_replay_job(tmp_path: Path, topology: str, steps: int = 2) -> None:
    """``areal-like run`` of multi-turn episodes (tests/unit/agent_envs.py's Chat: three turns, each
    turn's conversation so far a prefix the engine may serve from its cache) on a tiny Qwen3-MoE
    with ``trainer.routing_replay`` on ``topology``'s engine: it completes, and no group was
    dropped as bad data (a trajectory without its routes is)."""
    import json
    import subprocess
    import sys

    from tests.conftest import child_env
    from tests.families import save_family

    moe = save_family("qwen3_moe", tmp_path / "moe")
    run_dir = tmp_path / "run"
    envs = str(Path(__file__).resolve().parent / "unit")
    done = subprocess.run(
        [sys.executable, "-m", "launch.cli", "run", "experiment=guess_env", f"topology={topology}",
         "warm_start.steps=0", f"model.path={moe}", "model.attn_implementation=sdpa",
         "trainer.routing_replay=true", "task.env=agent_envs:Chat", "task.max_turns=3",
         "task.group_size=2", "buffer.groups_per_step=2", "launch.trainer_ranks=1",
         "launch.num_rollout_servers=1", f"trainer.steps={steps}", "eval.at_start=false",
         "eval.at_end=false", "launch.health_timeout_s=300", f"run_dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=1000,
        env=child_env({"PYTHONPATH": os.pathsep.join([envs, child_env()["PYTHONPATH"]])}))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_trained"] == steps and summary["reward_first"] == 1.5  # three turns each
    reports = [json.loads(line) for line in (run_dir / "metrics" / "trainer.jsonl").open()
               if '"groups_dropped_bad_data"' in line]
    assert reports and all(r["groups_dropped_bad_data"] == 0 for r in reports)


STANDIN = r"""
import sys
from {kit} import model_config, cpu_engine
from {cls.__module__} import {cls.__name__}
proc = {cls.__name__}(model_config(sys.argv[1]), cpu_engine(), log_path=sys.argv[2]).start()
print("READY", proc.proc.pid, proc.port, flush=True)
sys.stdin.read()  # until the test kills us
"""
GONE_DEADLINE_S = 60.0  # SIGKILL is immediate; the slack is for a loaded 2-core machine


def check_killed_server_takes_its_engine(kit: str, process_class, model_dir: Path,
                                         tmp_path: Path, inspect=lambda pgid, files: None):
    """A stand-in rollout server starts an engine with ``process_class`` (the tier's ``kit`` gives
    its flags) and is killed -9: the engine's process group, port, /dev/shm files and TMPDIR go.
    ``inspect(pgid, files)`` checks the live engine first."""
    tier = Path(sys.modules[kit].__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{tier}"}
    server = subprocess.Popen(
        [sys.executable, "-c", STANDIN.format(kit=kit, cls=process_class), str(model_dir),
         str(tmp_path / "engine.log")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        line = server.stdout.readline()
        assert line.startswith("READY"), f"the stand-in printed {line!r} (exit {server.poll()})"
        pgid, port = int(line.split()[1]), int(line.split()[2])
        files = shm_files(pgid)
        assert group_members(pgid) and not port_free(port)
        inspect(pgid, files)
        environ = Path(f"/proc/{pgid}/environ").read_bytes().split(b"\0")
        tmpdir = next(e[len(b"TMPDIR="):].decode() for e in environ if e.startswith(b"TMPDIR="))
        assert os.listdir(tmpdir), tmpdir  # its IPC sockets, in a directory of its own
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        wait_until(lambda: not group_members(pgid), GONE_DEADLINE_S, 0.1, f"group {pgid} gone")
        wait_until(lambda: port_free(port), GONE_DEADLINE_S, 0.1, f"port {port} free")
        wait_until(lambda: not any(os.path.exists(f) for f in [*files, tmpdir]), GONE_DEADLINE_S,
                   0.1, f"{sorted(files)} and {tmpdir} removed")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def check_killed_engine_is_relaunched(cfg, engine: str, cmdline: str, kill_at: int,
                                      wait_s: float) -> None:
    """In a running job, rollout-0's ``engine`` (its process's command line holds ``cmdline``) is
    killed -9 at step ``kill_at``: the server notices, one restart starts a new engine whose files
    the old one's leave behind, and the job reaches its last step with no further restart."""
    from tests.integration.system_harness import RunningSystem

    def engine_of(rs) -> psutil.Process | None:  # a killed one is a zombie until reaped
        try:
            kids = psutil.Process(rs.pid("rollout-0")).children()
        except psutil.Error:
            return None
        for kid in kids:
            with contextlib.suppress(psutil.Error):
                if cmdline in " ".join(kid.cmdline()):
                    return kid
        return None

    with RunningSystem(cfg) as rs:
        rs.wait_step(kill_at, timeout_s=wait_s)
        first = wait_until(lambda: engine_of(rs), 60, 0.1, f"the first {engine} process")
        files = shm_files(first.pid)
        first.send_signal(signal.SIGKILL)
        second = rs.wait_for(lambda: (e := engine_of(rs)) and e.pid != first.pid and e, wait_s,
                             f"a new {engine} under a new rollout server")
        assert rs.sup.proc("rollout-0").restarts == 1
        log = (rs.run_dir / "logs" / "rollout-0.log").read_text()
        assert f"its {engine} engine (pid {first.pid}) exited with code -9" in log
        wait_until(lambda: not any(os.path.exists(f) for f in files), GONE_DEADLINE_S, 0.1,
                   f"{sorted(files)} removed")
        rs.wait_for(rs.completed.is_set, 900, "the job's last step")
        assert rs.steps()[-1]["step"] == cfg.trainer.steps
        # the relaunched engine served to the end: a plan published while it started is not its
        # own (the buffer left it out at its fresh registration), so no second restart
        assert rs.sup.proc("rollout-0").restarts == 1
        log = (rs.run_dir / "logs" / "rollout-0.log").read_text()
        assert re.search(rf"{engine} healthy at \S+ \(pid {second.pid}\)", log), log
