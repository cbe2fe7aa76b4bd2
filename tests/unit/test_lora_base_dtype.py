"""With LoRA the frozen base is held in ``model.dtype`` (bf16: the log-probs FSDP2's cast gave,
bit for bit) and the adapters train in fp32."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from areal_like.settings.config import load_config
from areal_like.weights.lora import is_adapter
from tests.helpers_trainer import full_state_dict
from trainer.data import groups_to_batch
from trainer.model import build_policy, init_distributed, shard_model
from trainer.step import output_logp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_trainer_invariance import synthetic_groups  # noqa: E402


def dtypes(model: torch.nn.Module) -> dict[str, set[torch.dtype]]:
    out: dict[str, set[torch.dtype]] = {"adapter": set(), "base": set()}
    for name, p in model.named_parameters():
        out["adapter" if is_adapter(name) else "base"].add(p.dtype)
    return out


def test_a_bf16_run_holds_its_lora_base_in_bf16_and_trains_fp32_adapters():
    cfg = load_config(["trainer.lora.rank=4", "model.dtype=bfloat16", "trainer.lr=1e-2",
                       "trainer.pack_sequences=false"])
    init_distributed(cfg.trainer)
    policy = build_policy(cfg.model, cfg.trainer)
    assert dtypes(policy.model) == {"adapter": {torch.float32}, "base": {torch.bfloat16}}
    assert not any(p.requires_grad for n, p in policy.model.named_parameters()
                   if not is_adapter(n))
    mb = groups_to_batch(synthetic_groups()).select(torch.arange(4))
    valid = mb.mask > 0
    # the same numbers as an fp32 base cast to bf16 by FSDP2 for the forward
    fp32_base = shard_model(cfg.model, cfg.trainer, dtype="float32", lora=cfg.trainer.lora)
    assert dtypes(fp32_base)["base"] == {torch.float32}
    with torch.no_grad():
        want = output_logp(fp32_base, mb, 1.0)[valid]
        got = output_logp(policy.model, mb, 1.0)[valid]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # a step trains the adapters (fp32 gradients and AdamW moments), leaves the base as it was
    before = full_state_dict(policy.model)
    output_logp(policy.model, mb, 1.0)[valid].sum().backward()
    policy.optimizer.step()
    for p in policy.optimizer.param_groups[0]["params"]:
        assert p.grad.dtype == torch.float32
        state = policy.optimizer.state[p]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    after = full_state_dict(policy.model)
    assert all(torch.equal(t, before[n]) for n, t in after.items() if not is_adapter(n))
    # B starts at 0, so the first step moves each B (A's gradient is B^T times something: 0)
    assert all(not torch.equal(t, before[n]) for n, t in after.items() if ".lora_B." in n)


def test_a_float32_run_keeps_its_lora_base_in_fp32():
    cfg = load_config(["trainer.lora.rank=4"])
    assert cfg.model.dtype == "float32"  # the CPU topologies' dtype
    init_distributed(cfg.trainer)
    policy = build_policy(cfg.model, cfg.trainer)
    assert dtypes(policy.model) == {"adapter": {torch.float32}, "base": {torch.float32}}
