"""The one-GPU weight path on CUDA (marker gpu; skipped without CUDA): trainer and engine share
GPU 0.

1. A tensor payload of CUDA tensors (``trainer.weight_local.TensorSender``) carries CUDA IPC
   handles:
   another process decodes it (``rollout_server.engine.weights.decode_named_tensors``), gets
   tensors on the GPU that map the sender's memory, and reads exactly the sender's values.
2. End to end: the real buffer, one embedded engine on CUDA, a world-size-1 trainer on CUDA pushing
   with ``path=tensor`` then ``disk`` then ``tensor``: after each push the engine serves that
   version with weights bit-identical to the trainer's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_trainer_weight_sync import STARTUP_S, read_json  # noqa: E402
from weight_sync_harness import (  # noqa: E402
    Driver,
    engine_at,
    start_pusher,
    start_system,
    write_config,
)

ROOT = Path(__file__).resolve().parents[2]
DECODE = """
import sys, torch
from rollout_server.engine.weights import decode_named_tensors
t = decode_named_tensors(sys.stdin.read())
print(t["w"].device.type, float(t["w"].double().sum()), float(t["b"].double().sum()))
"""


def test_cuda_payload_is_an_ipc_handle_read_by_another_process():
    import torch

    from areal_like.settings.config import WeightSyncConfig
    from areal_like.weights.plan import BucketSpec
    from trainer.weight_local import TensorSender

    w, b = (torch.randn(64, 32, device="cuda"),
            torch.randn(32, device="cuda", dtype=torch.bfloat16))
    spec = BucketSpec(names=["w", "b"], dtypes=["float32", "bfloat16"], shapes=[[64, 32], [32]])
    sender = TensorSender(WeightSyncConfig(), "nccl", 0, "float32")
    payload = sender.payloads(None, 1, [spec], [[w, b]])[0]
    assert len(payload) < 4096  # handles, not bytes
    out = subprocess.run([sys.executable, "-c", DECODE], input=payload, capture_output=True,
                         text=True, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    device, ws, bs = out.stdout.split()
    assert (device == "cuda" and float(ws) == float(w.double().sum())
            and float(bs) == float(b.double().sum()))
    sender.close()


def test_one_gpu_tensor_and_disk_paths_end_to_end(tmp_path, spawn_python, free_port, wait_until):
    cfg, cfg_path = write_config(tmp_path, free_port, [
        "trainer.device=cuda", "rollout.engine.device=cuda", "trainer.weight_sync.deadline_s=60",
        "model.dtype=bfloat16"])
    _, urls = start_system(tmp_path, spawn_python, wait_until, cfg_path, ["rollout-a"])
    driver = Driver("rollout-a", urls["rollout-a"], cfg)
    driver.start()
    pushes = [{"version": 1, "members": 1, "path": "tensor"},
              {"version": 2, "members": 1, "path": "disk", "after": "checked-1"},
              {"version": 3, "members": 1, "path": "tensor", "after": "checked-2"}]
    start_pusher(spawn_python, cfg_path, tmp_path, pushes)
    try:
        for push in pushes:
            v = push["version"]
            rep = wait_until(lambda v=v: read_json(tmp_path / f"v{v}.json"), STARTUP_S, 0.2,
                             f"push v{v}")
            assert rep["done"] == ["rollout-a"] and not rep["error"], rep
            got = wait_until(lambda v=v: engine_at(tmp_path, "rollout-a", v), 60, 0.1,
                             f"engine at v{v}")
            assert got["sha"] == rep["sha"], (push, got, rep)
            (tmp_path / f"checked-{v}").write_text("")
    finally:
        driver.stop.set()
        driver.join(timeout=15)
