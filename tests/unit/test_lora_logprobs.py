"""The trainer's log-probs of a LoRA model (``trainer.model.policy_logprobs``: decoder, then the
chunked lm_head) equal the model's own forward, adapter on ``lm_head`` included, and equal the
base model's with the adapters off (the KL reference)."""

from __future__ import annotations

import torch

from areal_like.config import LoraConfig, ModelConfig
from areal_like.hf import build_model
from areal_like.lora import adapters_disabled, add_adapters, is_adapter
from trainer.model import policy_logprobs


def reference_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), -1)
    return logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]


def test_policy_logprobs_include_every_adapter_and_drop_them_when_disabled():
    cfg = ModelConfig()
    model = add_adapters(build_model(cfg), LoraConfig(rank=4, target_modules=["q_proj", "lm_head"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter(name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    ids = torch.randint(4, cfg.vocab_size, (2, 12), generator=gen)
    positions = torch.arange(11).expand(2, -1)
    with torch.no_grad():
        got = policy_logprobs(model, ids, positions, 1.0, chunk_tokens=5)
        with adapters_disabled(model):
            off = policy_logprobs(model, ids, positions, 1.0, chunk_tokens=5)
    torch.testing.assert_close(got, reference_logprobs(model, ids), rtol=0, atol=1e-5)
    base = reference_logprobs(build_model(cfg), ids)
    torch.testing.assert_close(off, base, rtol=0, atol=1e-5)
    assert (got - base).abs().max() > 1e-2  # the adapters change the numbers
