"""launch/memory.py: the accounting behind trainer/MEMORY.md, checked against real models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from areal_like.settings.config import ModelConfig
from areal_like.settings.schema import LoraConfig
from areal_like.weights.hf import build_meta_model, build_model
from areal_like.weights.lora import add_adapters, is_adapter
from benchmarks.memory import PeakTensorBytes
from launch.memory import (
    adapter_block_params,
    block_activation_bytes,
    block_params,
    estimate_critic_peak_bytes,
    estimate_lora_peak_bytes,
    estimate_peak_bytes,
    fp32_adapter_input_bytes,
    lora_block_activation_bytes,
    qwen2_shape,
    root_params,
    shape_of,
    total_params,
)
from tests.conftest import child_env, run_cli


def test_peak_tensor_bytes_counts_allocations_until_freed():
    before = torch.ones(1000)  # existed before: not counted
    with PeakTensorBytes() as m:
        a = torch.zeros(1000)  # 4000 bytes
        b = a[10:]  # a view: no new storage
        c = torch.zeros(500, dtype=torch.float64)  # 4000 bytes
        del a, b, c
        d = before + 1  # 4000 bytes, after the others were freed
    assert m.peak == 8000
    assert m.current == 4000
    del d


@pytest.mark.parametrize("name,published", [("0.5B", 494_032_768), ("1.5B", 1_543_714_304),
                                            ("7B", 7_615_616_512)])
def test_parameter_counts_match_the_model(name, published):
    cfg = qwen2_shape(name)
    model = build_meta_model(cfg)
    assert total_params(cfg) == sum(p.numel() for p in model.parameters()) == published
    assert block_params(cfg) == sum(p.numel() for p in model.model.layers[0].parameters())
    assert root_params(cfg) == published - cfg.num_hidden_layers * block_params(cfg)


def saved_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, tokens: int = 48,
                          lora_rank: int = 0, fp32_adapters: bool = False) -> float:
    model = build_model(cfg, dtype="float32")
    if lora_rank:  # PEFT freezes the base: its layers keep only what the adapters' gradients need
        add_adapters(model, LoraConfig(rank=lora_rank))
    model = model.to(dtype).train()
    if fp32_adapters:  # one unsharded rank: the base in dtype, the adapters fp32 (trainer/model.py)
        for name, p in model.named_parameters():
            if is_adapter(name):
                p.data = p.data.float()
    layer = model.model.layers[0]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randn(1, tokens, cfg.hidden_size, dtype=dtype, requires_grad=True)
    pos = torch.arange(tokens)[None]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=None, position_ids=pos,
              position_embeddings=model.model.rotary_emb(x, pos))
    # the block's input is saved by the block itself only through its RMSNorm; the formula counts
    # it once per block in any case (the previous block's output is held for this one)
    seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
    return sum(n for ptr, n in seen.items() if ptr not in params) / tokens


# fp32-adapters: a bf16 base with fp32 adapters, whose lora_A keeps an fp32 copy of its input
@pytest.mark.parametrize("dtype,c,rank,fp32_adapters", [
    (torch.float32, 4, 0, False), (torch.bfloat16, 2, 0, False), (torch.float32, 4, 8, False),
    (torch.bfloat16, 2, 8, False), (torch.bfloat16, 2, 8, True),
], ids=["plain-fp32", "plain-bf16", "lora-fp32", "lora-bf16", "fp32-adapters"])
@pytest.mark.parametrize("shape", [(128, 256, 4, 2), (192, 320, 6, 3)])
def test_block_activation_bytes_match_what_the_layer_saves(dtype, c, rank, fp32_adapters, shape):
    h, i, heads, kv = shape
    cfg = ModelConfig(vocab_size=104, hidden_size=h, intermediate_size=i, num_hidden_layers=1,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64)
    want = lora_block_activation_bytes(cfg, c, rank) if rank else block_activation_bytes(cfg, c)
    want += fp32_adapter_input_bytes(cfg, c, rank) if fp32_adapters else 0
    assert saved_bytes_per_token(cfg, dtype, lora_rank=rank, fp32_adapters=fp32_adapters) == want


def test_adapter_params_match_peft():
    cfg = qwen2_shape("0.5B", num_hidden_layers=2)
    model = add_adapters(build_meta_model(cfg), LoraConfig(rank=8))
    got = sum(p.numel() for n, p in model.named_parameters() if is_adapter(n))
    assert got == 2 * adapter_block_params(cfg, 8) == 2 * 4_399_104 // 24  # 4.4 M in 24 blocks


def test_lora_estimate_terms_by_hand():
    # h 128, I 256, 4 heads of 32, kv 64, vocab 104 untied, 2 blocks, rank 8 on the 7 linears
    cfg = ModelConfig(vocab_size=104, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    # A [8, in] + B [out, 8]: q 8*256, k and v 8*192, o 8*256, gate/up/down 8*384
    assert adapter_block_params(cfg, 8) == 2048 + 1536 + 1536 + 2048 + 3 * 3072 == 16384
    assert adapter_block_params(cfg, 8, ("q_proj", "v_proj")) == 3584
    with pytest.raises(ValueError, match="lm_head"):
        adapter_block_params(cfg, 8, ("q_proj", "lm_head"))
    assert block_params(cfg) == 147968 and root_params(cfg) == 104 * 128 * 2 + 128 == 26752
    # per token and block: the full model's 2246 fp32 values, less the 2 norms' 2 x 128, plus 7 x 8
    assert lora_block_activation_bytes(cfg, 4, 8) == (2246 - 256 + 56) * 4 == 8184
    e = estimate_lora_peak_bytes(cfg, world=1, micro_batch_tokens=64, rank=8)
    assert e.weights == 4 * (2 * 147968 + 26752) + 4 * 32768 == 1421824  # fp32 base + fp32 adapters
    assert (e.grads, e.adam, e.optimizer_temps) == (131072, 262144, 131072)  # adapters only
    assert e.gathered == e.gather_buffers == e.root_grads == 0  # one fp32 rank; frozen root
    assert e.block_grads == 16384 * 4
    assert e.logprobs == 64 * 104 * 4  # one [64, V] chunk; no lm_head gradient (frozen)
    # 2 blocks x 64 tokens x 8184, then final norm (less its frozen weight's input), hidden, ids
    assert e.activations == 2 * 64 * 8184 + 64 * 128 * 4 * 3 + 32 * 64 == 1147904
    assert e.moments == {"backward_start": 1815040 + 1147904 + 26624,
                         "backward_end": 1815040 + 65536, "optimizer_step": 1815040 + 131072}
    # a bf16 base on one rank computing in bf16 (the trainer's: the base in model.dtype) gathers
    # nothing; an fp32 base in bf16 compute does
    bf16 = estimate_lora_peak_bytes(cfg, 1, 64, 8, dtype="bfloat16")
    assert bf16 == estimate_lora_peak_bytes(cfg, 1, 64, 8, dtype="bfloat16", base_dtype="bfloat16")
    assert bf16.weights == 2 * 322688 + 4 * 32768 and bf16.gathered == 0
    mixed = estimate_lora_peak_bytes(cfg, 2, 64, 8, dtype="bfloat16", base_dtype="float32")
    assert mixed.gathered == (26752 + 2 * (147968 + 16384)) * 2
    assert mixed.weights == 4 * 161344 + 4 * 16384  # half of each, world 2


def test_estimate_terms():
    cfg = qwen2_shape("7B")
    one = estimate_peak_bytes(cfg, world=1, micro_batch_tokens=4096, dtype="bfloat16")
    eight = estimate_peak_bytes(cfg, world=8, micro_batch_tokens=4096, dtype="bfloat16")
    assert one.weights == 4 * 7_615_616_512 and eight.weights == 4 * 951_952_064
    assert eight.adam == 2 * eight.weights and eight.grads == eight.weights == eight.optimizer_temps
    assert one.activations == eight.activations and one.gathered == eight.gathered
    ckpt = estimate_peak_bytes(cfg, world=8, micro_batch_tokens=4096, dtype="bfloat16",
                               checkpointing=True)
    assert ckpt.activations < eight.activations / 10
    # the log-prob working set: one [512, V] fp32 block and its bf16 twin,
    # lm_head's fp32 accumulator and bf16 grad
    assert eight.logprobs == 512 * 152064 * 6 + 152064 * 3584 * 6
    assert eight.total == max(eight.moments.values()) == eight.moments["backward_start"]
    # 16 bytes per parameter alone put a 7B model past one 80 GB GPU; 8-way sharding brings it under
    assert one.total > 80e9 and eight.total < 80e9 and ckpt.total < eight.total
    fp32 = estimate_peak_bytes(qwen2_shape("0.5B"), world=1, micro_batch_tokens=512,
                               dtype="float32")
    # no fp32 copy without mixed precision
    assert fp32.block_grads == block_params(qwen2_shape("0.5B")) * 4
    # one fp32 rank is not sharded: nothing is gathered
    assert fp32.gathered == fp32.gather_buffers == 0
    # one micro-batch per optimizer step: no gradients are held when its backward starts
    single = estimate_peak_bytes(cfg, world=8, micro_batch_tokens=4096, dtype="bfloat16",
                                 accumulating=False)
    assert eight.moments["backward_start"] - single.moments["backward_start"] == eight.grads
    assert single.moments["backward_end"] == eight.moments["backward_end"]


WORKER = r"""
import json, resource, sys
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore
dist.init_process_group("fake", store=FakeStore(), rank=3, world_size=8)
from areal_like.weights.hf import build_meta_model
from launch.memory import qwen2_shape
from trainer.model import apply_fsdp
cfg = qwen2_shape("7B")
model = apply_fsdp(build_meta_model(cfg), cfg)
params = dict(model.named_parameters())
print(json.dumps({
    "n": len(params), "devices": sorted({p.device.type for p in params.values()}),
    "dtensor": all(isinstance(p, DTensor) for p in params.values()),
    "numel": sum(p.numel() for p in params.values()),
    "local": sum(p.to_local().numel() for p in params.values()),
    "embed_local": list(params["model.embed_tokens.weight"].to_local().shape),
    "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
}))
"""


def test_7b_shaped_model_is_sharded_on_meta_without_allocating_it():
    proc = subprocess.run([sys.executable, "-c", WORKER], capture_output=True, text=True,
                          timeout=300, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["n"] == 339 and got["dtensor"] and got["devices"] == ["meta"]
    assert got["numel"] == 7_615_616_512 and got["local"] == 951_952_064  # 1/8 of the rows, padded
    assert got["embed_local"] == [152064 // 8, 3584]
    assert got["rss"] < 1.5 * 2**30  # the rank's shard alone would be 3.8 GB in fp32


def test_critic_estimate_terms_by_hand():
    """With a critic: the larger of the policy's and the critic's step, each beside the other."""
    cfg = qwen2_shape("7B")  # untied lm_head [152064, 3584]
    est = estimate_critic_peak_bytes(cfg, world=8, micro_batch_tokens=2048, accumulating=False)
    policy = estimate_peak_bytes(cfg, world=8, micro_batch_tokens=2048, accumulating=False)
    head_shard = -(-152064 * 3584 // 8)
    assert est["without_critic"] == policy.total
    assert est["critic_held"] == policy.weights + policy.adam - 8 * head_shard
    assert est["policy_step"] == policy.total + est["critic_held"]
    assert est["peak"] == max(est["policy_step"], est["critic_step"])
    assert est["critic_step"] < est["policy_step"]  # no log-prob working set, a frozen head
    half = qwen2_shape("7B", num_hidden_layers=14)
    assert estimate_critic_peak_bytes(cfg, 8, 2048, critic_cfg=half)["peak"] < est["peak"]


# a small Qwen3-MoE config.json: head_dim x heads (1024) is the hidden size only by chance of
# the numbers; 16 experts of 2048, 2 routed per token
MOE_CONFIG = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
              "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 4096,
              "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
              "head_dim": 128, "num_experts": 16, "num_experts_per_tok": 2,
              "moe_intermediate_size": 2048, "max_position_embeddings": 4096,
              "tie_word_embeddings": False}


def test_mixture_terms_by_hand_with_and_without_expert_parallel():
    cfg = shape_of(MOE_CONFIG, "test")
    # a block: q 1024x1024, k and v 1024x512, o 1024x1024 (3145728), q/k norms 2x128, two
    # RMSNorms 2x1024, router 16x1024 (16384): 3164416 dense; experts 3 x 16 x 2048 x 1024
    experts, dense, root = 100_663_296, 3_164_416, 2 * 32000 * 1024 + 1024
    assert block_params(cfg) == dense + experts and root_params(cfg) == root
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**MOE_CONFIG))
    assert total_params(cfg) == sum(p.numel() for p in model.parameters()) == 480_847_872
    assert block_params(cfg) == sum(p.numel() for p in model.model.layers[0].parameters())

    whole = estimate_peak_bytes(cfg, world=4, micro_batch_tokens=128, dtype="bfloat16")
    ep = estimate_peak_bytes(cfg, world=4, micro_batch_tokens=128, dtype="bfloat16",
                             expert_parallel=4)
    # at rest 1/world of every parameter either way: 480847872 / 4 fp32 weights
    assert ep.weights == whole.weights == 480_847_872 and ep.adam == whole.adam
    # all-gathered in bf16: the root group and two blocks, a block with all 16 experts or its 4
    assert whole.gathered == (root + 2 * (dense + experts)) * 2 == 546_384_896
    assert ep.gathered == (root + 2 * (dense + experts // 4)) * 2 == 244_395_008
    # one block's unsharded gradient, bf16 + its fp32 copy
    assert whole.block_grads == (dense + experts) * 6
    assert ep.block_grads == (dense + experts // 4) * 6
    assert ep.activations == whole.activations
    # (the peak is the end of backward: the gathered params and the block's gradient differ)
    assert whole.total - ep.total == 2 * 2 * experts * 3 // 4 + 6 * experts * 3 // 4


def test_plan_prints_the_mixture_peak_with_and_without_expert_parallel(tmp_path):
    # as transformers 5 saves it (num_local_experts), where the published one says num_experts
    Qwen3MoeConfig(**MOE_CONFIG).save_pretrained(tmp_path)

    def plan(ep: int) -> list[str]:
        r = run_cli("plan", "topology=gpu_sglang", "launch.gpus_per_node=8",
                    "launch.trainer_ranks=4", f"trainer.expert_parallel={ep}",
                    f"model.path={tmp_path}", "model.dtype=bfloat16", timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout.split("memory per GPU")[1].splitlines()

    def peak(lines: list[str]) -> str:
        return next(x for x in lines if x.startswith("  trainer ")).split()[1]

    split, whole = plan(4), plan(1)
    # the gathered blocks above: 56660480 and 207655424 bytes of bf16
    assert (f"  experts  4-way expert parallel: a rank gathers 4 of each block's 16 experts, "
            f"0.05 GiB a gathered block, per-rank peak {peak(split)} GiB; without EP 0.19 GiB a "
            f"gathered block, per-rank peak {peak(whole)} GiB") in split
    assert ("  experts  not split (trainer.expert_parallel=1): every rank gathers each block's 16 "
            "experts, 0.19 GiB a gathered block") in whole
    assert float(peak(whole)) - float(peak(split)) == pytest.approx(0.7, abs=0.11)
