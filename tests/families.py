"""Tiny random models of each family the project supports, built from their transformers configs
(the char tokenizer's vocabulary, 2 layers): the rows of the README's family table
(tests/integration/test_families.py)."""

from __future__ import annotations

from pathlib import Path

# every family: 2 layers, 4 heads over 2 KV heads, the char tokenizer's 104 ids
COMMON = dict(vocab_size=104, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
# a window shorter than the tests' sequences, so sliding-window layers differ from full ones
WINDOW = 8


def _configs() -> dict:
    from transformers import (
        Gemma3TextConfig,
        GptOssConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    return {
        "qwen2": lambda: Qwen2Config(**COMMON),
        "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16),
        "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, head_dim=16, **moe),
        "llama3": lambda: LlamaConfig(**COMMON, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}),
        "mistral": lambda: MistralConfig(**COMMON, sliding_window=WINDOW),
        # tied, as every released Gemma 3 is: SGLang's Gemma 3 takes its logits from the input
        # embedding and never loads an lm_head.weight (launch/preflight.py refuses an untied one)
        "gemma3": lambda: Gemma3TextConfig(**{**COMMON, "tie_word_embeddings": True}, head_dim=16,
                                           query_pre_attn_scalar=16, sliding_window=WINDOW,
                                           sliding_window_pattern=2),
        "gpt_oss": lambda: GptOssConfig(**{**COMMON, "intermediate_size": 32}, head_dim=16,
                                        num_local_experts=4, num_experts_per_tok=2,
                                        sliding_window=WINDOW),
    }


FAMILIES = ("qwen2", "qwen3", "qwen3_moe", "llama3", "mistral", "gemma3", "gpt_oss")


def family_config(family: str):
    return _configs()[family]()


def save_family(family: str, directory: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random ``family`` model and the char tokenizer saved in ``directory``
    (safetensors, as a user's checkpoint); ``overrides``: its config's keys set otherwise."""
    import torch
    from transformers import AutoModelForCausalLM

    from areal_like.tasks.tokenizer import char_tokenizer

    torch.manual_seed(seed)
    config = family_config(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    impl = "eager" if family == "gpt_oss" else "sdpa"
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl)
    with torch.no_grad():  # a random init this small gives near-uniform logits: sharpen them
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(str(directory))
    char_tokenizer().save_pretrained(str(directory))
    return directory
