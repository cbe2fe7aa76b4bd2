"""``model.dtype=bfloat16`` on ONE trainer rank computes in bf16 with fp32 master weights (CPU).

A world of one used to be left unsharded, and only FSDP2's mixed-precision policy casts, so it
trained in fp32 whatever ``model.dtype`` said (both GPU topologies default to one trainer rank).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER = r"""
import json, sys
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/tests/integration")
import torch
torch.set_num_threads(1)
from test_trainer_invariance import synthetic_groups
from areal_like.settings.config import load_config
from trainer.data import groups_to_batch
from trainer.model import build_policy, init_distributed
from tests.helpers_trainer import full_state_dict
from trainer.step import StepSettings, recompute_prox_logp, train_step

cfg = load_config([f"model.dtype={sys.argv[2]}", "trainer.lr=1e-3", "trainer.micro_batch_size=8"])
init_distributed(cfg.trainer)
policy = build_policy(cfg.model, cfg.trainer)
seen = []
linear = policy.model.model.layers[0].self_attn.q_proj
hook = linear.register_forward_pre_hook(
    lambda mod, args: seen.append([str(args[0].dtype), str(mod.weight.dtype),
                                   torch.is_grad_enabled()]))
batch = groups_to_batch(synthetic_groups())
before = full_state_dict(policy.model)
s = StepSettings.from_config(cfg)
stats = train_step(policy, batch, s, recompute_prox_logp(policy, batch, s))
hook.remove()
after = full_state_dict(policy.model)
print("RESULT " + json.dumps({
    "seen": seen, "loss": stats["loss"],
    "params": sorted({str(p.dtype) for p in policy.model.parameters()}),
    "grads": sorted({str(p.grad.dtype) for p in policy.model.parameters() if p.grad is not None}),
    "adam": sorted({str(v.dtype) for st in policy.optimizer.state.values() for k, v in st.items()
                    if k != "step"}),
    "moved": max(float((after[k] - before[k]).abs().max()) for k in before)}), flush=True)
"""


def _run(dtype: str) -> dict:
    from tests.conftest import child_env

    proc = subprocess.run([sys.executable, "-c", WORKER, str(ROOT), dtype], capture_output=True,
                          text=True, timeout=300, env=child_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_one_rank_computes_in_model_dtype_with_fp32_master_weights(dtype):
    res = _run(dtype)
    training = [(x, w) for x, w, grad in res["seen"] if grad]  # the forward that trains (not prox)
    assert training, res["seen"]
    want = f"torch.{dtype}"
    assert set(training) == {(want, want)}  # the Linear's input and (cast) weight
    assert res["params"] == res["grads"] == res["adam"] == ["torch.float32"]  # fp32 masters
    assert res["moved"] > 1e-5 and res["loss"] == res["loss"]
