"""The buffer's routing-replay facts (``job_facts.model_routes``, read from config.json without
torch) are the shape the trainer's model replays (``routing.route_shape``) and its expert count,
for mixtures whose layers are not all sparse (``decoder_sparse_step``, ``mlp_only_layers``)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from areal_like.job_facts import model_routes
from areal_like.settings.config import ModelConfig, RunConfig, TrainerConfig
from areal_like.weights.routing import route_shape


@pytest.mark.parametrize("family,extra", [
    ("qwen3_moe", {}),
    ("qwen3_moe", {"num_hidden_layers": 4, "decoder_sparse_step": 2}),
    ("qwen2_moe", {"num_hidden_layers": 3, "mlp_only_layers": [1]}),
])
def test_the_buffers_route_facts_are_the_trainers_route_shape(tmp_path, family, extra):
    config = AutoConfig.for_model(family, vocab_size=104, hidden_size=32, intermediate_size=64,
                                  num_attention_heads=2, num_key_value_heads=1, num_experts=6,
                                  num_experts_per_tok=2, moe_intermediate_size=16,
                                  **{"num_hidden_layers": 2, **extra})
    config.save_pretrained(tmp_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    cfg = RunConfig(run_dir=str(tmp_path / "run"), model=ModelConfig(path=str(tmp_path)),
                    trainer=TrainerConfig(routing_replay=True))
    assert model_routes(cfg) == (*route_shape(model), 6)
    cfg.trainer = TrainerConfig(routing_replay=False)
    assert model_routes(cfg) is None  # unchecked: the trainer ignores routes then
