"""One trainer rank on CUDA, ``model.dtype=bfloat16``: one train_step (marker gpu; needs CUDA).

Single process, world-size-1 group (``cpu:gloo,cuda:nccl``), so it runs on any machine with one GPU
(the one-GPU layout's trainer). Three runs of the same batch: fp32, bf16, and bf16 with activation
checkpointing. Checks:
- bf16 compute: a forward pre-hook on a decoder ``Linear`` sees bf16 input and weight in the
  forward that trains (fp32 in the fp32 run), while master weights and gradients stay fp32;
- the loss and gradient norm are finite and close to the fp32 run's (bf16 tolerance), and the
  step moves the weights;
- activation checkpointing recomputes each block in backward (the MLP of block 0 runs twice per
  training forward/backward, once without) and leaves the loss and gradient norm as they were.
"""

from __future__ import annotations

import json
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
from areal_like.settings.config import load_config
from trainer.data import groups_to_batch
from trainer.model import build_policy, init_distributed
from tests.helpers_trainer import full_state_dict
from trainer.step import StepSettings, recompute_prox_logp, train_step

batch = groups_to_batch(synthetic_groups())
out = {}
RUNS = (("fp32", "float32", False), ("bf16", "bfloat16", False), ("bf16_ckpt", "bfloat16", True))


def training(record):  # count only the forwards that train (not the no-grad prox pass)
    return lambda m, a: record(m, a) if torch.is_grad_enabled() else None


for name, dtype, ckpt in RUNS:
    cfg = load_config(["trainer.device=cuda", f"model.dtype={dtype}", "trainer.lr=1e-3",
                       "trainer.micro_batch_size=4",
                       f"trainer.activation_checkpointing={str(ckpt).lower()}"])
    init_distributed(cfg.trainer)
    policy = build_policy(cfg.model, cfg.trainer)
    block = policy.model.model.layers[0]
    seen, mlp_calls, forwards = [], [], []
    h1 = block.self_attn.q_proj.register_forward_pre_hook(
        training(lambda m, a: seen.append([str(a[0].dtype), str(m.weight.dtype)])))
    h2 = block.mlp.register_forward_pre_hook(training(lambda m, a: mlp_calls.append(1)))
    h3 = policy.model.model.norm.register_forward_pre_hook(  # outside the blocks: not recomputed
        training(lambda m, a: forwards.append(1)))
    before = full_state_dict(policy.model)
    s = StepSettings.from_config(cfg)
    stats = train_step(policy, batch, s, recompute_prox_logp(policy, batch, s))
    h1.remove(); h2.remove(); h3.remove()
    after = full_state_dict(policy.model)
    out[name] = {"loss": stats["loss"], "grad_norm": stats["grad_norm"],
                 "seen": sorted(set(map(tuple, seen))),
                 "mlp_calls": len(mlp_calls), "forwards": len(forwards),
                 "param_dtypes": sorted({str(p.dtype) for p in policy.model.parameters()}),
                 "moved": max(float((after[k] - before[k]).abs().max()) for k in before)}
print("RESULT " + json.dumps(out), flush=True)
"""


def test_one_rank_bf16_train_step_on_cuda():
    from tests.conftest import child_env

    proc = subprocess.run([sys.executable, "-c", WORKER, str(REPO)], capture_output=True, text=True,
                          timeout=600, env=child_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    fp32, bf16, ckpt = res["fp32"], res["bf16"], res["bf16_ckpt"]
    assert fp32["seen"] == [["torch.float32", "torch.float32"]]
    assert bf16["seen"] == ckpt["seen"] == [["torch.bfloat16", "torch.bfloat16"]]  # bf16 compute
    for r in (fp32, bf16, ckpt):
        assert r["param_dtypes"] == ["torch.float32"]  # master weights stay fp32
        assert r["loss"] == r["loss"] and abs(r["loss"]) < 1e3 and 0 < r["grad_norm"] < 1e3
        assert r["moved"] > 1e-5
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=5e-2, abs=5e-3)
    assert bf16["grad_norm"] == pytest.approx(fp32["grad_norm"], rel=1e-1)
    # recomputed in backward: the MLP runs once more per training forward than without
    assert bf16["mlp_calls"] == bf16["forwards"] and ckpt["mlp_calls"] == 2 * ckpt["forwards"]
    assert ckpt["loss"] == pytest.approx(bf16["loss"], rel=1e-3, abs=1e-5)
    assert ckpt["grad_norm"] == pytest.approx(bf16["grad_norm"], rel=1e-2)


LORA_WORKER = r"""
import json, sys
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/tests/integration")
import torch
torch.set_num_threads(1)
from test_trainer_invariance import synthetic_groups
from areal_like.settings.config import load_config
from trainer.data import groups_to_batch
from trainer.model import build_policy, init_distributed
from tests.helpers_trainer import full_state_dict
from trainer.step import StepSettings, recompute_prox_logp, reference_logp, train_step

batch = groups_to_batch(synthetic_groups())
out = {}
for dtype in ("float32", "bfloat16"):
    cfg = load_config(["trainer.device=cuda", f"model.dtype={dtype}", "trainer.lr=1e-2",
                       "trainer.micro_batch_size=4", "trainer.lora.rank=8",
                       "trainer.loss.kl_coef=0.1",
                       "trainer.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
                       "down_proj,lm_head]"])
    init_distributed(cfg.trainer)
    policy = build_policy(cfg.model, cfg.trainer)
    base = policy.model.model.layers[0].self_attn.q_proj.base_layer  # PEFT's wrapped Linear
    seen = []
    hook = base.register_forward_pre_hook(lambda m, a: seen.append([str(a[0].dtype),
                                                                    str(m.weight.dtype)])
                                          if torch.is_grad_enabled() else None)
    before = full_state_dict(policy.model)
    s = StepSettings.from_config(cfg)
    # the KL reference first (adapters off), as the loop's first step does; two steps: B moves
    # in the first (PEFT's B starts at zero, so A's gradient is zero then), A in the second
    stats = [train_step(policy, batch, s, recompute_prox_logp(policy, batch, s),
                        reference_logp(policy.model, batch, s, policy.device))["loss"]
             for _ in range(2)]
    hook.remove()
    after = full_state_dict(policy.model)
    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    out[dtype] = {"loss": stats, "seen": sorted(set(map(tuple, seen))),
                  "trainable": sorted(trainable),
                  "moved": {k: float((after[k] - before[k]).abs().max()) for k in before}}
print("RESULT " + json.dumps(out), flush=True)
"""


def test_one_rank_lora_bf16_train_step_on_cuda():
    """LoRA with ``model.dtype=bfloat16`` on CUDA (the GPU topologies' default): the frozen base's
    Linear computes in bf16, only the adapters (the output head's included) move, and the loss is
    the fp32 run's within bf16 rounding (tests/integration/test_trainer_lora.py is the CPU twin)."""
    from tests.conftest import child_env

    proc = subprocess.run([sys.executable, "-c", LORA_WORKER, str(REPO)], capture_output=True,
                          text=True, timeout=600, env=child_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    fp32, bf16 = res["float32"], res["bfloat16"]
    assert bf16["seen"] == [["torch.bfloat16", "torch.bfloat16"]]
    assert fp32["trainable"] == bf16["trainable"]
    assert any(n.startswith("lm_head.lora_A") for n in bf16["trainable"])
    for r in (fp32, bf16):
        for name, moved in r["moved"].items():
            assert (moved > 0) if name in r["trainable"] else moved == 0.0, name
    assert bf16["loss"] == pytest.approx(fp32["loss"], abs=2e-2)  # both steps
