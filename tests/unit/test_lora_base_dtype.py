"""With LoRA the frozen base is held in ``model.dtype`` (bf16: the log-probs FSDP2's cast gave,
bit for bit) and the adapters train in fp32; the policy's only dropout is the adapters'."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from areal_like.settings.config import load_config
from areal_like.tasks.tokenizer import load_tokenizer
from areal_like.weights.hf import build_model
from areal_like.weights.lora import is_adapter
from tests.helpers_trainer import full_state_dict
from trainer.data import groups_to_batch
from trainer.model import build_policy, init_distributed, shard_model
from trainer.step import StepSettings, batch_logp, output_logp

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


def test_a_float32_lora_run_keeps_its_base_fp32_and_no_dropout_but_the_adapters(tmp_path):
    """The policy has no dropout of its own whatever config.json says (the engines sample without
    it: pi_theta / pi_prox is exactly 1 at a step's start); trainer.lora.dropout is its own knob."""
    base = load_config([])
    model = build_model(base.model, dtype="float32")
    model.config.attention_dropout = 0.5
    model.save_pretrained(tmp_path)
    load_tokenizer(base.model).save_pretrained(tmp_path)
    cfg = load_config(["model=local_hf", f"model.path={tmp_path}",
                       "trainer.pack_sequences=false", "trainer.lora.rank=4",
                       "trainer.lora.dropout=0.1"])
    assert cfg.model.dtype == "float32"  # the CPU topologies' dtype
    init_distributed(cfg.trainer)
    torch.manual_seed(0)
    policy = build_policy(cfg.model, cfg.trainer)
    assert dtypes(policy.model) == {"adapter": {torch.float32}, "base": {torch.float32}}
    assert policy.model.training
    dropouts = {n: m.p for n, m in policy.model.named_modules() if isinstance(m, torch.nn.Dropout)}
    lora = [p for n, p in dropouts.items() if "lora" in n]
    assert lora and all(p == 0.1 for p in lora)
    assert all(p == 0.0 for n, p in dropouts.items() if "lora" not in n)
    with torch.no_grad():  # the adapter's B is 0 at init: its dropout changes nothing yet
        batch = groups_to_batch(synthetic_groups())
        mb = batch.select(torch.arange(4))
        first, second = (output_logp(policy.model, mb, 1.0) for _ in range(2))
        prox = batch_logp(policy.model, batch, StepSettings.from_config(cfg), policy.device)
    valid = mb.mask > 0
    torch.testing.assert_close(first[valid], second[valid], rtol=0, atol=0)
    torch.testing.assert_close(first[valid], prox[:4, :first.shape[1]][valid], rtol=0, atol=1e-6)
