"""Weight sync on CPU: a 2-rank FSDP2 trainer pushes to 2 embedded engines (real processes);
v2 kills engine A mid-sync (session open, before its first bucket), v3 pushes to B alone."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from pathlib import Path

RUNNER = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
# the sync deadline under test (generous for a loaded machine; bounds the v2 wait)
DEADLINE_S = 10.0
STARTUP_S = 180.0  # cold imports of torch + transformers in 5 processes on 2 shared cores


def weights_sha(named) -> str:
    import torch

    h = hashlib.sha256()
    for name, t in sorted(named):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- subprocess roles
def engine_role(cfg_path: str, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    from areal_like.net.auth import engine_api_key
    from areal_like.settings.config import load_daemon_config
    from rollout_server.engine.embedded import EmbeddedEngine

    cfg = load_daemon_config(["--config-file", cfg_path])
    # its door proves the job's key to a group's gate (made by the first of the job's processes
    # to ask, as the daemons make it); its HTTP API takes any caller
    key = engine_api_key(cfg.run_dir, make=True)
    engine = EmbeddedEngine(cfg.model, cfg.rollout.engine, lora=cfg.trainer.lora,
                            group_key=key).start()
    Path(out + ".url").write_text(engine.url)
    seen = None
    while True:  # report the weights whenever the served version changes (until killed/terminated)
        v = engine.scheduler.weight_version
        if v != seen:
            time.sleep(0.2)  # let the last bucket's copy finish (the version is set with it)
            Path(out + ".tmp").write_text(json.dumps(
                {"version": v, "sha": weights_sha(engine.model.named_parameters())}))
            os.replace(out + ".tmp", out)
            seen = v
        time.sleep(0.1)


def trainer_role(cfg_path: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    from test_trainer_invariance import synthetic_groups

    from areal_like.net.dealer import Client
    from areal_like.settings.config import load_daemon_config
    from areal_like.wire.protocol import RosterRequest, TrajectoryGroup
    from areal_like.wire.trajectory import Trajectory, as_f32, as_i32
    from tests.helpers_trainer import full_state_dict
    from trainer.data import groups_to_batch
    from trainer.model import build_policy, init_distributed, leave_distributed
    from trainer.step import StepSettings, output_logp, recompute_prox_logp, train_step
    from trainer.weight_sync import WeightBroadcaster

    cfg = load_daemon_config(["--config-file", cfg_path])
    rank, _ = init_distributed(cfg.trainer)
    policy = build_policy(cfg.model, cfg.trainer)
    s = StepSettings.from_config(cfg)
    batch = groups_to_batch(synthetic_groups())
    from areal_like.net.auth import engine_api_key

    wb = WeightBroadcaster(cfg.trainer.weight_sync, buffer_address=cfg.buffer.address, rank=rank,
                           device=policy.device, engine_key=engine_api_key(cfg.run_dir, make=True))
    out = Path(out_dir)
    client = Client(cfg.buffer.address) if rank == 0 else None

    def wait_roster(n: int) -> None:
        while rank == 0 and len(client.request(RosterRequest()).members) != n:
            time.sleep(0.2)
        dist.barrier()

    for version, members in ((1, 2), (2, 2), (3, 1)):
        wait_roster(members)
        train_step(policy, batch, s, recompute_prox_logp(policy, batch, s))
        rep = wb.push(policy.model, version)
        sha = weights_sha(full_state_dict(policy.model).items())
        if rank == 0:
            (out / f"v{version}.json").write_text(json.dumps({**rep.__dict__, "sha": sha}))
        if version == 1:  # probe: logprobs of the engines' samples under the trainer's weights
            probe = [None]
            while rank == 0 and not (out / "probe.json").exists():
                time.sleep(0.1)
            if rank == 0:
                probe = [json.loads((out / "probe.json").read_text())]
            dist.broadcast_object_list(probe, src=0)
            mb = groups_to_batch([TrajectoryGroup(
                group_id="probe", server_id="probe", lease_id="probe", prompt_index=0, epoch=0,
                trajectories=[Trajectory.of(prompt_ids=as_i32(p), output_ids=as_i32(o),
                                         behav_logp=as_f32([0.0] * len(o)),
                                         versions=as_i32([0] * len(o)),
                                         reward=0.0, finish_reason="length")
                              for p, o in probe[0]])])
            with torch.no_grad():
                lp = output_logp(policy.model, mb, cfg.task.temperature)
            if rank == 0:
                (out / "probe_logp.json").write_text(json.dumps(
                    [lp[i, :len(o)].tolist() for i, (_, o) in enumerate(probe[0])]))
    wb.close()
    leave_distributed()


async def sample_probe(
        url: str, prompts: list[list[int]]) -> list[tuple[list[int], list[int], list[float]]]:
    from areal_like.engines.sglang import SGLangClient

    async with SGLangClient(url, timeout_s=60) as sg:
        outs = [await sg.generate(p, {"max_new_tokens": 8, "temperature": 1.0}) for p in prompts]
    return [(p, list(o.output_ids), list(o.logprobs)) for p, o in zip(prompts, outs)]


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_two_rank_trainer_pushes_to_two_engines_and_survives_a_kill(
        tmp_path, spawn_python, free_port, wait_until):
    from areal_like.settings.config import load_config, to_yaml

    cfg = load_config([
        f"run_dir={tmp_path}", "security.curve=false",
        f"buffer.address=tcp://127.0.0.1:{free_port()}",
        f"buffer.pub_address=tcp://127.0.0.1:{free_port()}", "buffer.heartbeat_timeout_s=3",
        "task.temperature=1.0", f"trainer.weight_sync.deadline_s={DEADLINE_S}",
        "trainer.weight_sync.bucket_mb=0.25", "trainer.lr=1e-2",
        "rollout.engine.max_running_requests=4", "rollout.engine.max_total_tokens=2048"])
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(to_yaml(cfg))
    spawn_python("buffer", ["--config-file", cfg_path], capture=False)
    engines = {sid: spawn_python(RUNNER, [__file__, "engine", cfg_path, tmp_path / sid],
                                 capture=False)
               for sid in ("rollout-a", "rollout-b")}
    urls = {sid: wait_until(lambda sid=sid: read_json(tmp_path / sid)
                                            and (tmp_path / f"{sid}.url").read_text(),
                            STARTUP_S, 0.2, f"engine {sid}") for sid in engines}
    from weight_sync_harness import Driver

    drivers = [Driver("rollout-a", urls["rollout-a"], cfg, fault="session",
                      engine_pid=engines["rollout-a"].pid, at_pause=2),  # v2's
               Driver("rollout-b", urls["rollout-b"], cfg)]
    for d in drivers:
        d.start()
    port = free_port()
    trainers = [spawn_python(RUNNER, [__file__, "trainer", cfg_path, tmp_path], capture=False,
                             env={"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
                for rank in (0, 1)]

    def result(name: str):
        codes = [t.poll() for t in trainers]
        assert all(c in (None, 0) for c in codes), (
            f"a trainer rank died: exit codes by rank {codes} (see its log above)")
        assert all(d.error is None for d in drivers), [d.error for d in drivers]
        return read_json(tmp_path / name)

    try:
        v1 = wait_until(lambda: result("v1.json"), STARTUP_S, 0.2, "trainer push v1")
        assert sorted(v1["done"]) == ["rollout-a", "rollout-b"] and not v1["dropped"], v1
        assert v1["reform"] and v1["bytes"] > 0
        # exact weights: every parameter byte-identical to the trainer's full state
        for sid in engines:
            got = wait_until(lambda sid=sid: (r := read_json(tmp_path / sid))
                                             and r["version"] == "1" and r,
                             30, 0.1, f"{sid} at version 1")
            assert got["sha"] == v1["sha"], sid
        probes = [s for sid in engines
                  for s in asyncio.run(sample_probe(urls[sid], [[1, 20, 30, 40], [1, 50, 60]]))]
        (tmp_path / "probe.tmp").write_text(json.dumps([[p, o] for p, o, _ in probes]))
        # rank 0 reads it once it exists
        os.replace(tmp_path / "probe.tmp", tmp_path / "probe.json")
        trainer_lp = wait_until(lambda: result("probe_logp.json"), 60, 0.1, "probe logprobs")
        for (_, _, engine_lp), lp in zip(probes, trainer_lp):
            assert max(abs(a - b) for a, b in zip(engine_lp, lp)) < 1e-4, (engine_lp, lp)

        v2 = wait_until(lambda: result("v2.json"), 120, 0.2, "trainer push v2")
        assert "rollout-a" in v2["dropped"], v2
        # finished within its deadline (+ gather/announce slack)
        assert v2["seconds"] <= DEADLINE_S + 5.0, v2
        # (in practice sooner: A left the roster after buffer.heartbeat_timeout_s and was
        # dropped then)
        assert drivers[0].killed.is_set() and engines["rollout-a"].poll() is not None

        v3 = wait_until(lambda: result("v3.json"), 120, 0.2, "trainer push v3")
        assert v3["members"] == ["rollout-b"] and v3["done"] == ["rollout-b"], v3
        assert v3["reform"] == ("rollout-b" not in v2["repushed"]
                                or "rollout-b" not in v2["done"]), v3
        # (a group re-formed for B by v2's re-push stays warm)
        got = wait_until(lambda: (r := read_json(tmp_path / "rollout-b"))
                                 and r["version"] == "3" and r,
                         30, 0.1, "rollout-b at version 3")
        assert got["sha"] == v3["sha"]
    finally:
        for d in drivers:
            d.stop.set()
        for d in drivers:
            d.join(timeout=15)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    role, args = sys.argv[2], sys.argv[3:]
    {"engine": engine_role, "trainer": trainer_role}[role](*args)
    from areal_like.daemon import exit_process

    # as the trainer exits: FSDP's caches keep the gloo group's threads past
    # destroy_process_group, and the interpreter's teardown can abort on them (SIGABRT)
    exit_process(0)
