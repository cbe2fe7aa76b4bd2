"""The policy has no dropout of its own whatever config.json says (the engines sample without it:
pi_theta / pi_prox is exactly 1 at a step's start); trainer.lora.dropout is its own knob."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from areal_like.settings.config import load_config
from areal_like.tasks.tokenizer import load_tokenizer
from areal_like.weights.hf import build_model
from trainer.data import groups_to_batch
from trainer.model import build_policy, init_distributed
from trainer.step import StepSettings, batch_logp, output_logp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_trainer_invariance import synthetic_groups  # noqa: E402


def test_a_configs_dropout_is_off_in_the_training_forward(tmp_path):
    base = load_config([])
    model = build_model(base.model, dtype="float32")
    model.config.attention_dropout = 0.5
    model.save_pretrained(tmp_path)
    load_tokenizer(base.model).save_pretrained(tmp_path)
    cfg = load_config(["model=local_hf", f"model.path={tmp_path}",
                       "trainer.pack_sequences=false", "trainer.lora.rank=4",
                       "trainer.lora.dropout=0.1"])
    init_distributed(cfg.trainer)
    torch.manual_seed(0)
    policy = build_policy(cfg.model, cfg.trainer)
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
