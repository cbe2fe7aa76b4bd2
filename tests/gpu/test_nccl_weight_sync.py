"""Weight broadcast from the trainer to an embedded engine on CUDA (marker gpu; skipped without
CUDA).

The real buffer daemon, one embedded engine on CUDA (bf16), one rollout-server stand-in
(``weight_sync_harness.Driver``: it registers and heartbeats), and a world-size-1 trainer on CUDA
pushing with ``WeightBroadcaster``, driving the engine. With two GPUs the engine runs on GPU 0 and
the trainer on GPU 1 over NCCL; with one GPU both share it and the group uses gloo on CUDA tensors
(NCCL refuses two ranks on one device). Checks: the engine's weights equal the trainer's full state
exactly (bf16 bytes, SHA-256) and the engine serves the new version.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_trainer_weight_sync import RUNNER, STARTUP_S, read_json  # noqa: E402
from weight_sync_harness import Driver  # noqa: E402

TRAINER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/tests/integration")
import torch
torch.set_num_threads(1)
from test_trainer_weight_sync import weights_sha
from areal_like.net.auth import engine_api_key
from areal_like.settings.config import load_daemon_config
from areal_like.wire.protocol import RosterRequest
from areal_like.net.dealer import Client
from trainer.model import build_policy, init_distributed
from tests.helpers_trainer import full_state_dict
from trainer.weight_sync import WeightBroadcaster

cfg = load_daemon_config(["--config-file", sys.argv[2]])
init_distributed(cfg.trainer)
policy = build_policy(cfg.model, cfg.trainer)
with torch.no_grad():  # new weights, different from the engine's initial ones
    for p in policy.model.parameters():
        p.add_(0.01)
client = Client(cfg.buffer.address)
while len(client.request(RosterRequest()).members) != 1:
    time.sleep(0.2)
wb = WeightBroadcaster(cfg.trainer.weight_sync, buffer_address=cfg.buffer.address, rank=0,
                       device=policy.device, send_dtype=cfg.model.dtype,
                       engine_key=engine_api_key(cfg.run_dir, make=True))
rep = wb.push(policy.model, 1)
full = {k: v.to(torch.bfloat16) for k, v in full_state_dict(policy.model).items()}
print("RESULT " + json.dumps({**rep.__dict__, "sha": weights_sha(full.items())}), flush=True)
wb.close()
"""


def test_weight_broadcast_to_cuda_engine(tmp_path, spawn_python, free_port, wait_until):
    import torch

    from areal_like.settings.config import load_config, to_yaml

    two_gpus = torch.cuda.device_count() >= 2
    cfg = load_config([
        f"run_dir={tmp_path}", "security.curve=false",
        f"buffer.address=tcp://127.0.0.1:{free_port()}",
        f"buffer.pub_address=tcp://127.0.0.1:{free_port()}",
        "model.dtype=bfloat16", "rollout.engine.device=cuda",
        "trainer.device=cuda", f"trainer.weight_sync.backend={'nccl' if two_gpus else 'gloo'}",
        "trainer.weight_sync.deadline_s=120", "trainer.weight_sync.bucket_mb=0.25",
        "rollout.engine.max_running_requests=4", "rollout.engine.max_total_tokens=2048"])
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(to_yaml(cfg))
    spawn_python("buffer", ["--config-file", cfg_path], capture=False)
    engine = spawn_python(RUNNER, [str(Path(__file__).resolve().parents[1] / "integration" /
                                       "test_trainer_weight_sync.py"), "engine", cfg_path,
                                   tmp_path / "gpu"],
                          capture=False, env={"CUDA_VISIBLE_DEVICES": "0"})
    url = wait_until(lambda: read_json(tmp_path / "gpu") and (tmp_path / "gpu.url").read_text(),
                     STARTUP_S, 0.2,
                     "the CUDA engine")
    driver = Driver("gpu", url, cfg)
    driver.start()
    try:
        trainer = spawn_python(TRAINER, [Path(__file__).resolve().parents[2], cfg_path],
                               env={"CUDA_VISIBLE_DEVICES": "1" if two_gpus else "0"})
        out, err = trainer.communicate(timeout=600)
        assert trainer.returncode == 0, err[-4000:]
        rep = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        assert rep["done"] == ["gpu"] and not rep["dropped"] and rep["bytes"] > 0, rep
        got = wait_until(lambda: (r := read_json(tmp_path / "gpu")) and r["version"] == "1" and r,
                         60, 0.1,
                         "engine at version 1")
        assert got["sha"] == rep["sha"]
        assert engine.poll() is None
    finally:
        driver.stop.set()
        driver.join(timeout=15)
