"""Adapter-only weight sync to the embedded engine (trainer.lora.rank > 0), real processes;
lm_head among the targets covers the chunked lm_head."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a role: beside its siblings
from test_trainer_weight_sync import (  # noqa: E402
    RUNNER,
    STARTUP_S,
    read_json,
    sample_probe,
    weights_sha,
)
from weight_sync_harness import Driver, engine_at, start_system, write_config  # noqa: E402

PROMPTS = [[1, 20, 30, 40], [1, 50, 60]]


def trainer_role(cfg_path: str, out_dir: str) -> None:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    from test_trainer_invariance import synthetic_groups

    from areal_like.net.auth import engine_api_key
    from areal_like.net.dealer import Client
    from areal_like.settings.config import load_daemon_config
    from areal_like.weights.lora import adapters_disabled, is_adapter
    from areal_like.wire.protocol import RosterRequest, TrajectoryGroup
    from areal_like.wire.trajectory import Trajectory, as_f32, as_i32
    from tests.helpers_trainer import full_state_dict
    from trainer.data import groups_to_batch
    from trainer.model import build_policy, init_distributed, leave_distributed
    from trainer.step import StepSettings, output_logp, recompute_prox_logp, train_step
    from trainer.weight_sync import WeightBroadcaster

    cfg = load_daemon_config(["--config-file", cfg_path])
    init_distributed(cfg.trainer)
    policy = build_policy(cfg.model, cfg.trainer)
    s, batch = StepSettings.from_config(cfg), groups_to_batch(synthetic_groups())
    out = Path(out_dir)
    wb = WeightBroadcaster(  # the job's engine key, as a trainer holds it
        cfg.trainer.weight_sync, buffer_address=cfg.buffer.address, rank=0, device=policy.device,
        engine_key=engine_api_key(cfg.run_dir, make=True))
    client = Client(cfg.buffer.address)
    while len(client.request(RosterRequest()).members) != 1:
        time.sleep(0.2)
    adapter_bytes = sum(p.numel() * 4 for n, p in policy.model.named_parameters() if is_adapter(n))
    for version in (1, 2):
        train_step(policy, batch, s, recompute_prox_logp(policy, batch, s))
        rep = wb.push(policy.model, version)
        sha = weights_sha(full_state_dict(policy.model).items())
        (out / f"v{version}.json").write_text(
            json.dumps({**rep.__dict__, "sha": sha, "adapter_bytes": adapter_bytes}))
        if version == 1:  # the engine's samples scored by the trainer, with and without the adapter
            while not (out / "probe.json").exists():
                time.sleep(0.1)
            probe = json.loads((out / "probe.json").read_text())
            trajectories = [Trajectory.of(prompt_ids=as_i32(p), output_ids=as_i32(o),
                                          behav_logp=as_f32([0.0] * len(o)),
                                          versions=as_i32([0] * len(o)), reward=0.0,
                                          finish_reason="length") for p, o in probe]
            mb = groups_to_batch([TrajectoryGroup(group_id="probe", server_id="probe",
                                                  lease_id="probe", prompt_index=0, epoch=0,
                                                  trajectories=trajectories)])
            with torch.no_grad():
                lp = output_logp(policy.model, mb, cfg.task.temperature)
                with adapters_disabled(policy.model):
                    base = output_logp(policy.model, mb, cfg.task.temperature)
            rows = [{"lora": lp[i, :len(o)].tolist(), "base": base[i, :len(o)].tolist()}
                    for i, (_, o) in enumerate(probe)]
            (out / "probe_logp.json").write_text(json.dumps(rows))
    wb.close()
    client.close()
    leave_distributed()


def test_adapter_sync_reaches_the_engine_exactly(tmp_path, spawn_python, free_port, wait_until):
    cfg, cfg_path = write_config(tmp_path, free_port, [
        "trainer.lora.rank=4", "trainer.lora.alpha=8", "trainer.lr=1e-2", "task.temperature=1.0",
        # lm_head: the trainer's chunked head adds its delta (trainer.model.output_weight)
        "trainer.lora.target_modules=[q_proj,v_proj,down_proj,lm_head]",
        "trainer.weight_sync.deadline_s=30"])
    engines, urls = start_system(tmp_path, spawn_python, wait_until, cfg_path, ["rollout-a"])
    driver = Driver("rollout-a", urls["rollout-a"], cfg)
    driver.start()
    trainer = spawn_python(RUNNER, [__file__, "trainer", cfg_path, tmp_path], capture=False)

    def result(name: str):
        assert trainer.poll() in (None, 0), f"the trainer died (exit {trainer.returncode})"
        assert driver.error is None, driver.error
        return read_json(tmp_path / name)

    try:
        for v in (1, 2):
            rep = wait_until(lambda v=v: result(f"v{v}.json"), STARTUP_S, 0.2, f"trainer push v{v}")
            assert rep["done"] == ["rollout-a"] and not rep["error"], rep
            assert rep["bytes"] == rep["adapter_bytes"], rep  # the adapter alone went over the wire
            got = wait_until(lambda v=v: engine_at(tmp_path, "rollout-a", v), 30, 0.1,
                             f"engine at v{v}")
            assert got["sha"] == rep["sha"]  # its base + the adapter = the trainer's whole state
            if v == 1:
                probes = asyncio.run(sample_probe(urls["rollout-a"], PROMPTS))
                (tmp_path / "probe.json").write_text(json.dumps([[p, o] for p, o, _ in probes]))
                trainer_lp = wait_until(lambda: result("probe_logp.json"), 60, 0.1,
                                        "probe logprobs")
                for (_, _, engine_lp), row in zip(probes, trainer_lp):
                    assert max(abs(a - b) for a, b in zip(engine_lp, row["lora"])) < 1e-5, (
                        engine_lp, row)
                off = max(abs(a - b) for (_, _, e), row in zip(probes, trainer_lp)
                          for a, b in zip(e, row["base"]))
                assert off > 1e-3  # the engine serves the adapter, not its base
        assert trainer.wait(timeout=60) == 0
        assert engines["rollout-a"].poll() is None
    finally:
        driver.stop.set()
        driver.join(timeout=15)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    role, args = sys.argv[2], sys.argv[3:]
    {"trainer": trainer_role}[role](*args)
    from areal_like.daemon import exit_process

    # as the trainer exits: FSDP's caches keep the gloo group's threads past
    # destroy_process_group, and the interpreter's teardown can abort on them (SIGABRT)
    exit_process(0)
