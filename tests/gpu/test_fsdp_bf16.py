"""FSDP2 on CUDA with the bf16 mixed-precision policy: one train_step (marker gpu; skipped without CUDA).

Single process, world-size-1 group (``cpu:gloo,cuda:nccl``), so it runs on any machine with one GPU.
Checks: master weights stay fp32 while compute runs in bf16, the loss and gradient norm are finite
and close to an fp32 run of the same batch (bf16 tolerance), and the step moves the weights.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKER = r"""
import json, sys
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/tests/integration")
import torch
torch.set_num_threads(1)
from test_trainer_invariance import synthetic_groups
from areal_like.config import load_config
from trainer.data import groups_to_batch
from trainer.model import build_policy, full_state_dict, init_distributed
from trainer.step import StepSettings, recompute_prox_logp, train_step

batch = groups_to_batch(synthetic_groups())
out = {}
for dtype in ("float32", "bfloat16"):
    cfg = load_config(["trainer.device=cuda", f"model.dtype={dtype}", "trainer.lr=1e-3", "trainer.micro_batch_size=4"])
    init_distributed(cfg.trainer)
    policy = build_policy(cfg.model, cfg.trainer)
    before = full_state_dict(policy.model)
    s = StepSettings.from_config(cfg)
    stats = train_step(policy, batch, s, recompute_prox_logp(policy, batch, s))
    after = full_state_dict(policy.model)
    out[dtype] = {"loss": stats["loss"], "grad_norm": stats["grad_norm"],
                  "param_dtypes": sorted({str(p.dtype) for p in policy.model.parameters()}),
                  "moved": max(float((after[k] - before[k]).abs().max()) for k in before)}
print("RESULT " + json.dumps(out), flush=True)
"""


def test_fsdp2_bf16_train_step_on_cuda():
    proc = subprocess.run([sys.executable, "-c", WORKER, str(REPO)], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json

    res = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    fp32, bf16 = res["float32"], res["bfloat16"]
    assert bf16["param_dtypes"] == ["torch.float32"]  # master weights stay fp32 under MixedPrecisionPolicy
    for r in (fp32, bf16):
        assert r["loss"] == r["loss"] and abs(r["loss"]) < 1e3 and 0 < r["grad_norm"] < 1e3
        assert r["moved"] > 1e-5
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=5e-2, abs=5e-3)
    assert bf16["grad_norm"] == pytest.approx(fp32["grad_norm"], rel=1e-1)
