"""Memory per GPU of a job: what one trainer rank holds at the peak of a step, what an engine
holds (its weights and KV cache at its memory share), and ``memory_lines``, which
``areal-like plan`` prints for the resolved config against ``launch.gpu_memory_gb``.

``estimate_peak_bytes`` is the accounting behind ``trainer/MEMORY.md``: what one trainer rank
holds at the peak of a step under FSDP2 (``trainer/model.py``): its 1/world share of the fp32
master weights, gradients and two AdamW moments, plus the transient terms of the largest of three
moments: the start of backward (the gradients of an earlier micro-batch of the same optimizer
step, when there is one; the root group and two decoder blocks all-gathered in compute dtype,
twice, as FSDP2 frees an all-gather's flat output only at the next all-gather; the activations
kept for backward -- every block's, or only the block inputs with activation checkpointing plus
one block recomputed -- and the log-prob working set: one ``[chunk, vocab]`` block,
``trainer/logprobs.py``, and lm_head's gradient), the end of backward (the root group's gradients
being reduced) and the optimizer step (foreach AdamW's temporary, the square root of the second
moment). ``benchmarks/bench_trainer_memory.py`` checks it against a measured step.

Not counted: the allocator's fragmentation, NCCL buffers, the weight-sync staging buffers, an
engine's activations and CUDA graphs outside its memory share (leave a few GiB of headroom). The
blocks are modelled as Qwen2's (Llama's, with q/k/v biases) or Qwen3-MoE's (``MixtureShape``:
every block a mixture of experts, which ``trainer.expert_parallel`` splits); another mixture,
or a dense ``head_dim`` other than ``hidden_size / num_attention_heads``, gets no estimate. No
I/O but reading a ``config.json`` (a local ``model.path`` or the Hugging Face cache); nothing is
downloaded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from areal_like.settings.config import ModelConfig, RunConfig
from areal_like.settings.schema import LORA_DEFAULT_TARGETS, MixtureShape

GIB = 2**30

# Qwen2 shapes of the published checkpoints (config.json), for the tables in trainer/MEMORY.md
# (3B is Qwen2.5's; Qwen2.5's 0.5B, 1.5B and 7B have the Qwen2 shapes).
QWEN2_SHAPES: dict[str, dict] = {
    "0.5B": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "1.5B": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "3B": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
               num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
    "7B": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}


def qwen2_shape(name: str, **overrides) -> ModelConfig:
    """A ``ModelConfig`` of one of ``QWEN2_SHAPES`` (built from config: random weights)."""
    return ModelConfig(**{"max_position_embeddings": 32768, **QWEN2_SHAPES[name], **overrides})


def expert_params(cfg: ModelConfig) -> int:
    """Parameters of one block's experts (none in a dense block)."""
    if not isinstance(cfg, MixtureShape):
        return 0
    return 3 * cfg.num_experts * cfg.moe_intermediate_size * cfg.hidden_size


def head_dim(cfg: ModelConfig) -> int:
    if isinstance(cfg, MixtureShape):
        return cfg.head_dim
    return cfg.hidden_size // cfg.num_attention_heads


def block_params(cfg: ModelConfig) -> int:
    """Parameters of one decoder block: Qwen2's q/k/v (with bias), o, gate/up/down, two RMSNorms;
    Qwen3-MoE's q/k/v/o, q/k norms, two RMSNorms, the router and every expert."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    if isinstance(cfg, MixtureShape):
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        return (2 * h * q + 2 * h * kv + 2 * cfg.head_dim + 2 * h + cfg.num_experts * h
                + expert_params(cfg))
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    return (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h


def gathered_block_params(cfg: ModelConfig, expert_parallel: int = 1) -> int:
    """Parameters one rank all-gathers for a block: all of it, or under ``expert_parallel`` N its
    dense parts and its own E/N experts (their FSDP2 unit spans the ranks holding the same
    experts, trainer/experts.py)."""
    return block_params(cfg) - expert_params(cfg) + expert_params(cfg) // expert_parallel


def root_params(cfg: ModelConfig) -> int:
    """Parameters outside the blocks (FSDP2's root group): embeddings, final norm, untied
    lm_head."""
    return (cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
            + cfg.hidden_size)


def total_params(cfg: ModelConfig) -> int:
    return cfg.num_hidden_layers * block_params(cfg) + root_params(cfg)


def block_activation_bytes(cfg: ModelConfig, c: int) -> int:
    """Bytes one decoder block keeps for backward per token, its input included, in compute dtype
    of ``c`` bytes: the tensors Hugging Face's Qwen2 layer (SDPA attention) saves, counted with
    ``saved_tensors_hooks`` (tests/unit/test_memory.py checks the count): in units of ``c`` bytes,
    8H + 4I + 2 kv_dim + 2 head_dim + heads + 2 in fp32; in bf16 the RMSNorms' fp32 upcasts and
    the attention's fp32 log-sum-exp add 3H + heads + 2. A ``MixtureShape`` block is counted as
    a dense one as wide as a token's routed experts (top_k x I) plus its router logits: an
    approximation, not checked against the layer."""
    h, i, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    hd = head_dim(cfg)
    kv = cfg.num_key_value_heads * hd
    units = 8 * h + 2 * kv + 2 * hd + heads + 2
    if isinstance(cfg, MixtureShape):
        units += 4 * cfg.num_experts_per_tok * cfg.moe_intermediate_size + cfg.num_experts
    else:
        units += 4 * i
    if c != 4:
        units += 3 * h + heads + 2
    return units * c


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer of a Qwen2 decoder block, by the name that
    ``trainer.lora.target_modules`` matches."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def adapter_block_params(cfg: ModelConfig, rank: int, targets=LORA_DEFAULT_TARGETS) -> int:
    """Parameters of one block's LoRA adapters: A [rank, in] and B [out, rank] per targeted linear
    (areal_like/weights/lora.py). Only the blocks' linear layers are modelled: another target
    (``lm_head``) is a ValueError, not a silent zero."""
    shapes = linear_shapes(cfg)
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"LoRA targets {unknown}: the estimate models {sorted(shapes)} only")
    return sum(rank * sum(shapes[t]) for t in targets)


def lora_block_activation_bytes(cfg: ModelConfig, c: int, rank: int,
                                targets=LORA_DEFAULT_TARGETS) -> int:
    """``block_activation_bytes`` of a block with LoRA adapters on a frozen base: less the two
    RMSNorms' normalised inputs (2H, kept only for the frozen norm weights' gradient), plus each
    targeted linear's low-rank intermediate (lora_A's output, kept by lora_B: ``rank`` values).
    Every targeted linear's input is kept by its lora_A as the base linear's would be. Exact for
    the default targets (tests/unit/test_memory.py counts the real layer with
    ``saved_tensors_hooks``); with fewer targets an upper bound (an untargeted frozen linear need
    not keep its input)."""
    adapter_block_params(cfg, rank, targets)  # the same ValueError for a target not modelled
    return block_activation_bytes(cfg, c) + (len(targets) * rank - 2 * cfg.hidden_size) * c


# the linear layers of a block that read one input, which only they keep (o_proj's input, the
# attention's output, is kept by the attention itself)
INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("down_proj",))


def fp32_adapter_input_bytes(cfg: ModelConfig, c: int, rank: int,
                             targets=LORA_DEFAULT_TARGETS) -> int:
    """Per token and block, what fp32 adapters on an unsharded base of ``c`` bytes keep beyond
    ``lora_block_activation_bytes``: PEFT casts each targeted linear's input to the adapter's
    dtype, and lora_A keeps that fp32 copy instead of the shared compute-dtype input; lora_A's
    output is fp32 too (tests/unit/test_memory.py counts the real layer). Measured on CPU:
    ``benchmarks/bench_trainer_memory.py --lora-rank 8 --dtype bfloat16`` (trainer/MEMORY.md,
    section 4)."""
    shapes = linear_shapes(cfg)
    copies = sum(shapes[t][0] for t in targets) * 4
    shared = sum(shapes[g[0]][0] for g in INPUT_GROUPS if set(g) & set(targets)) * c
    return copies - shared + len(targets) * rank * (4 - c)


def activation_bytes(cfg: ModelConfig, t: int, c: int, checkpointing: bool, per_block: int) -> int:
    """The activations kept for backward at ``t`` tokens: every block's ``per_block`` (or the block
    inputs plus one block recomputed, checkpointed), then the final norm, the gathered hidden
    states and the token ids."""
    if checkpointing:
        acts = cfg.num_hidden_layers * t * cfg.hidden_size * c + t * per_block
    else:
        acts = cfg.num_hidden_layers * t * per_block
    return acts + t * cfg.hidden_size * (4 * c if c == 4 else 4 * c + 8) + 32 * t




@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of one trainer rank, by term (see ``estimate_peak_bytes``)."""

    weights: int  # this rank's shard of the fp32 master weights
    grads: int  # ... of the fp32 gradients
    adam: int  # ... of AdamW's two fp32 moments
    gathered: int  # unsharded compute-dtype parameters: the root group, the current and
                   # the next block
    gather_buffers: int  # FSDP2's flat all-gather outputs of the same,
                         # held until the next all-gather
    block_grads: int  # one block's unsharded gradient
                      # (compute dtype, plus its fp32 copy for reduction)
    activations: int  # what the forward keeps for backward
    logprobs: int  # one [chunk, V] block (and its compute-dtype twin)
                   # + lm_head's gradient accumulator
    root_grads: int  # the root group's unsharded gradients at the end of backward
                     # (+ the embedding's, + the new shard)
    optimizer_temps: int  # the foreach AdamW step's temporary: sqrt of the second moment
                          # (a shard-sized fp32 list)
    accumulating: bool = True  # gradients of an earlier micro-batch are held when a backward starts

    @property
    def moments(self) -> dict[str, int]:
        """The three candidate peaks: the start of backward (every activation and the log-prob
        working set alive; gradients of earlier micro-batches held), its end (the root group's
        gradients being reduced) and the optimizer step."""
        held = self.weights + self.grads + self.adam
        start = held - (0 if self.accumulating else self.grads)
        return {"backward_start": start + self.gathered + self.gather_buffers + self.activations
                                  + self.logprobs,
                "backward_end": held + self.gathered + self.block_grads + self.root_grads,
                "optimizer_step": held + self.optimizer_temps}

    @property
    def total(self) -> int:
        return max(self.moments.values())


def estimate_peak_bytes(model_cfg: ModelConfig, world: int, micro_batch_tokens: int,
                        dtype: str = "bfloat16",
                        checkpointing: bool = False, logprob_chunk: int = 512,
                        accumulating: bool = True, expert_parallel: int = 1) -> MemoryEstimate:
    """Peak memory of one trainer rank in a step: FSDP2 over ``world`` ranks, ``micro_batch_tokens``
    tokens per forward/backward, compute in ``dtype`` (fp32 master weights). ``accumulating``: an
    optimizer step takes more than one micro-batch, so an earlier one's gradients are held when a
    backward starts (with one, none are: the step frees them, ``zero_grad(set_to_none=True)``).
    ``expert_parallel`` N: a mixture's experts split over N ranks; the state at rest is the same
    1/world per rank, a gathered block (and its unsharded gradient) holds E/N experts, not E."""
    c = 4 if dtype == "float32" else 2
    # mixed precision: the fp32 copy a bf16 gradient is reduced in / upcast to
    mp = 4 if c != 4 else 0
    p, root = total_params(model_cfg), root_params(model_cfg)
    blk = gathered_block_params(model_cfg, expert_parallel)
    t, h, v = micro_batch_tokens, model_cfg.hidden_size, model_cfg.vocab_size
    acts = activation_bytes(model_cfg, t, c, checkpointing, block_activation_bytes(model_cfg, c))
    chunk = min(logprob_chunk, t)
    logprobs = chunk * v * (4 + c * (mp > 0)) + v * h * (4 + c * (mp > 0))
    shard = -(-p // world)
    # the embedding's dense gradient exists beside lm_head's until they are summed (tied weights);
    # from the second micro-batch on, the reduce-scatter's output is a new shard added to the
    # held one
    root_grads = (root * (c + mp) + (v * h * c if model_cfg.tie_word_embeddings else 0)
                  + 4 * -(-root // world))
    # one fp32 rank is not sharded (trainer/model.py): it computes on its master weights,
    # gathers nothing
    gathered = (root + 2 * blk) * c if world > 1 or c != 4 else 0
    return MemoryEstimate(weights=4 * shard, grads=4 * shard, adam=8 * shard, gathered=gathered,
                          gather_buffers=gathered,
                          block_grads=blk * (c + mp), activations=acts, logprobs=logprobs,
                          root_grads=root_grads,
                          optimizer_temps=4 * shard, accumulating=accumulating)


def estimate_lora_peak_bytes(model_cfg: ModelConfig, world: int, micro_batch_tokens: int, rank: int,
                             targets=LORA_DEFAULT_TARGETS, dtype: str = "float32",
                             base_dtype: str | None = None, checkpointing: bool = False,
                             logprob_chunk: int = 512, accumulating: bool = True) -> MemoryEstimate:
    """``estimate_peak_bytes`` with LoRA adapters of ``rank`` on ``targets`` (``trainer.lora``):
    the frozen base is held in ``base_dtype`` (default ``dtype``: the trainer keeps it in
    ``model.dtype``, ``trainer/model.py`` ``base_dtype``) with no gradient or AdamW state; the
    adapters hold fp32 weights, gradients, two moments and AdamW's temporary.
    The ranks gather (FSDP2) when ``world`` > 1 or the compute dtype is not the base's (mixed
    precision); one rank computing in its base's dtype is not sharded and gathers nothing. Frozen
    embeddings and lm_head: no root gradients, no lm_head gradient accumulator; the final norm,
    frozen too, keeps no normalised input. The KL reference (the policy with its adapters off) is
    a no-grad forward: its transients are not counted, as the full model's reference is not."""
    c, b = (4 if d == "float32" else 2 for d in (dtype, base_dtype or dtype))
    mp = 4 if c != 4 else 0
    blk_a = adapter_block_params(model_cfg, rank, targets)
    a = model_cfg.num_hidden_layers * blk_a
    p, blk, root = total_params(model_cfg), block_params(model_cfg), root_params(model_cfg)
    t, v = micro_batch_tokens, model_cfg.vocab_size
    per_block = lora_block_activation_bytes(model_cfg, c, rank, targets)
    if world == 1 and c == b != 4:  # not sharded: the fp32 adapters compute in fp32
        per_block += fp32_adapter_input_bytes(model_cfg, c, rank, targets)
    acts = activation_bytes(model_cfg, t, c, checkpointing, per_block)
    acts -= t * model_cfg.hidden_size * c  # the frozen final norm keeps no normalised input
    logprobs = min(logprob_chunk, t) * v * (4 + c * (mp > 0))
    shard_p, shard_a = -(-p // world), -(-a // world)
    gathered = (root + 2 * (blk + blk_a)) * c if world > 1 or c != b else 0
    return MemoryEstimate(weights=b * shard_p + 4 * shard_a, grads=4 * shard_a, adam=8 * shard_a,
                          gathered=gathered, gather_buffers=gathered, block_grads=blk_a * (c + mp),
                          activations=acts, logprobs=logprobs, root_grads=0,
                          optimizer_temps=4 * shard_a, accumulating=accumulating)



def estimate_critic_peak_bytes(model_cfg: ModelConfig, world: int, micro_batch_tokens: int,
                               dtype: str = "bfloat16", checkpointing: bool = False,
                               logprob_chunk: int = 512, accumulating: bool = True,
                               critic_cfg: ModelConfig | None = None) -> dict[str, int]:
    """PPO with a critic (``trainer.critic``, trainer/critic.py): the peak of one trainer rank
    holding the policy and a critic of ``critic_cfg`` (default the policy's shape). Each model
    frees its gradients after its step, so between steps it holds its weights and AdamW moments;
    the peak is the larger of the policy's step beside the critic's held state and the critic's
    step beside the policy's. The critic's step is ``estimate_peak_bytes`` of its shape without
    the log-prob working set (a scalar head), and an untied lm_head, unused, keeps its weight
    shard but no gradient or AdamW state."""
    c_cfg = critic_cfg or model_cfg
    policy = estimate_peak_bytes(model_cfg, world, micro_batch_tokens, dtype, checkpointing,
                                 logprob_chunk, accumulating)
    critic = estimate_peak_bytes(c_cfg, world, micro_batch_tokens, dtype, checkpointing,
                                 logprob_chunk, accumulating)
    head = 0 if c_cfg.tie_word_embeddings else c_cfg.vocab_size * c_cfg.hidden_size
    shard = -(-head // world)
    # the unused head's unsharded gradient (compute dtype + its fp32 copy): 4 bytes either way
    critic = replace(critic, logprobs=c_cfg.hidden_size * 4, grads=critic.grads - 4 * shard,
                     adam=critic.adam - 8 * shard, optimizer_temps=critic.optimizer_temps
                     - 4 * shard, root_grads=critic.root_grads - 4 * head)
    policy_held, critic_held = policy.weights + policy.adam, critic.weights + critic.adam
    return {"policy_step": policy.total + critic_held, "critic_step": critic.total + policy_held,
            "critic_held": critic_held, "without_critic": policy.total,
            "peak": max(policy.total + critic_held, critic.total + policy_held)}




# ------------------------------------------------------------------ a job's shapes and placement
# the published Qwen2 / Qwen2.5 checkpoints the recipes name (their config.json: QWEN2_SHAPES),
# so that `plan` sizes them on a machine that has not downloaded them
HUB_SHAPES = {f"Qwen/Qwen{v}-{size}{kind}": size
              for v, sizes in (("2", ("0.5B", "1.5B", "7B")), ("2.5", tuple(QWEN2_SHAPES)))
              for size in sizes for kind in ("", "-Instruct")}
# Qwen3-30B-A3B's config.json (the shape keys), for its recipe on a machine without the checkpoint
QWEN3_MOE_CONFIGS = {"Qwen/Qwen3-30B-A3B": dict(
    model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
    num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    tie_word_embeddings=False, max_position_embeddings=40960, num_experts=128,
    num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1, mlp_only_layers=[])}
CUDA_CONTEXT_GIB = 0.5  # per process on a GPU (trainer/MEMORY.md, section 2)
MIXTURE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")


class NoEstimate(ValueError):
    """The model's shape is unknown here, or not one the accounting models."""


def shape_of(config: dict, where: str) -> ModelConfig:
    """The ``ModelConfig`` of a ``config.json``'s dict (a multimodal one's ``text_config``); a
    ``MixtureShape`` for Qwen3-MoE's (every block a mixture)."""
    config = config.get("text_config") or config
    try:
        shape = {k: config[k] for k in SHAPE_KEYS[:5]}
    except KeyError as e:
        raise NoEstimate(f"{where} has no {e.args[0]}") from None
    shape["num_key_value_heads"] = config.get("num_key_value_heads") or shape["num_attention_heads"]
    shape["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
    shape["max_position_embeddings"] = config.get("max_position_embeddings", 1)
    head = config.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
    experts = next((config[k] for k in MIXTURE_KEYS if config.get(k)), 0)
    if experts:
        if (config.get("model_type") != "qwen3_moe" or config.get("mlp_only_layers")
                or config.get("decoder_sparse_step", 1) != 1):
            raise NoEstimate(f"{where} is a mixture of experts other than Qwen3-MoE's with every "
                             "block a mixture; the estimate models that one and dense blocks")
        return MixtureShape(**shape, num_experts=experts, head_dim=head,
                            num_experts_per_tok=config["num_experts_per_tok"],
                            moe_intermediate_size=config["moe_intermediate_size"])
    if head * shape["num_attention_heads"] != shape["hidden_size"]:
        raise NoEstimate(f"{where}: head_dim {head} x {shape['num_attention_heads']} heads is "
                         f"not hidden_size {shape['hidden_size']}; the estimate models Qwen2's "
                         "blocks")
    return ModelConfig(**shape)


def model_shape(model_cfg: ModelConfig) -> ModelConfig:
    """The shape ``model_cfg`` trains: its own fields (built from config), a local ``model.path``'s
    ``config.json``, a hub id's in the Hugging Face cache, or a recipe's published shape
    (``HUB_SHAPES``); ``NoEstimate`` saying why not."""
    path = model_cfg.path
    if not path:
        return model_cfg
    local = Path(path).expanduser() / "config.json"
    if not local.is_file():
        local = _cached_config(path)
    if local is not None:
        return shape_of(json.loads(local.read_text()), f"model.path={path}")
    if path in HUB_SHAPES:
        return qwen2_shape(HUB_SHAPES[path])
    if path in QWEN3_MOE_CONFIGS:
        return shape_of(QWEN3_MOE_CONFIGS[path], f"model.path={path}")
    raise NoEstimate(f"model.path={path}: no config.json here or in the Hugging Face cache")


def _cached_config(repo: str) -> Path | None:
    """A hub id's ``config.json`` in the Hugging Face cache (never downloaded), or None."""
    from areal_like.weights.hf import looks_like_hub_id

    if not looks_like_hub_id(repo):
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, "config.json")
    return Path(found) if isinstance(found, str) else None


def dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def kv_bytes_per_token(shape: ModelConfig, dtype: str, tp: int = 1) -> int:
    """An engine's KV cache per token per GPU: a key and a value per layer and KV head."""
    hd = head_dim(shape)
    heads = max(1, math.ceil(shape.num_key_value_heads / tp))  # tp > heads: replicated
    return 2 * shape.num_hidden_layers * heads * hd * dtype_bytes(dtype)


@dataclass(frozen=True)
class TrainerMemory:
    """One trainer rank's estimate, and what it was computed for."""

    estimate: MemoryEstimate
    total: int  # bytes at the peak (with a critic: the larger of the two models' steps)
    ranks: int
    tokens: int  # per micro-batch
    extra: dict[str, int]  # held besides the policy's step: a critic's state, a KL reference


def micro_batch_tokens(cfg: RunConfig) -> tuple[int, bool]:
    """(tokens per forward/backward at most, whether an optimizer step takes more than one):
    the token budget (a longer sequence runs alone) or ``micro_batch_size`` of the longest
    sequences (``task.max_prompt_tokens`` + ``task.max_new_tokens``; an unbounded prompt counts as
    none)."""
    tr, task = cfg.trainer, cfg.task
    longest = task.max_prompt_tokens + task.max_new_tokens
    ranks = trainer_world(cfg)
    per_step = -(-cfg.buffer.groups_per_step * task.group_size // (ranks * tr.num_minibatches))
    if tr.max_tokens_per_micro_batch:
        tokens = max(tr.max_tokens_per_micro_batch, longest)
        return tokens, per_step * longest > tokens
    return min(tr.micro_batch_size, per_step) * longest, per_step > tr.micro_batch_size


def trainer_world(cfg: RunConfig) -> int:
    la = cfg.launch
    return (la.trainer_ranks or 1) * (la.train_nodes if la.nodes > 1 else 1)


def trainer_memory(cfg: RunConfig, shape: ModelConfig,
                   expert_parallel: int | None = None) -> TrainerMemory:
    """What one trainer rank of ``cfg`` holds at its peak (``NoEstimate`` for a LoRA target the
    accounting does not model, or LoRA on a mixture), with ``trainer.expert_parallel`` or the
    ``expert_parallel`` given."""
    tr, world, dtype = cfg.trainer, trainer_world(cfg), cfg.model.dtype
    ep = expert_parallel or tr.expert_parallel
    tokens, many = micro_batch_tokens(cfg)
    common = dict(checkpointing=tr.activation_checkpointing, logprob_chunk=tr.logprob_chunk_tokens,
                  accumulating=many)
    extra = {}
    if tr.lora.enabled:
        if isinstance(shape, MixtureShape):
            raise NoEstimate("trainer.lora on a mixture of experts: the estimate models dense "
                             "blocks' adapters")
        try:
            est = estimate_lora_peak_bytes(shape, world, tokens, tr.lora.rank,
                                           tr.lora.target_modules, dtype=dtype, **common)
        except ValueError as e:
            raise NoEstimate(f"trainer.lora.target_modules: {e}") from None
        return TrainerMemory(est, est.total, world, tokens, extra)
    est = estimate_peak_bytes(shape, world, tokens, dtype, expert_parallel=ep, **common)
    total = est.total
    if tr.loss.kl_coef > 0:  # the frozen reference's shards, in model.dtype
        extra["KL reference"] = -(-total_params(shape) // world) * dtype_bytes(dtype)
    if tr.critic.enabled:
        critic = {k: v for k, v in tr.critic.model.items() if k in SHAPE_KEYS}
        both = estimate_critic_peak_bytes(shape, world, tokens, dtype,
                                          critic_cfg=replace(shape, **critic), **common)
        extra["critic"] = both["peak"] - both["without_critic"]
    return TrainerMemory(est, total + sum(extra.values()), world, tokens, extra)


@dataclass(frozen=True)
class EngineMemory:
    """One engine's bytes per GPU: its weights and KV cache (``share``: the fraction of the GPU
    its flags cap it at, or None: the engine sizes itself)."""

    name: str
    weights: int
    kv_cache: int | None  # None: what the engine's own default share leaves
    kv_tokens: int | None
    share: float | None
    flag: str = ""

    @property
    def total(self) -> int:
        return self.weights + (self.kv_cache or 0)


def engine_memory(cfg: RunConfig, shape: ModelConfig, gpu_bytes: int) -> EngineMemory:
    """An SGLang or vLLM engine's weights per GPU (``tp_size`` splits them) and the KV cache its
    memory share leaves; the embedded engine's weights and ``max_total_tokens`` KV slots."""
    from launch.placement import MEMORY_SHARE_FLAGS, memory_share

    ec = cfg.rollout.engine
    flags = getattr(ec, ec.kind) if ec.kind in MEMORY_SHARE_FLAGS else {}
    dtype = flags.get("dtype") or cfg.model.dtype
    dtype = dtype if dtype in ("float32", "bfloat16", "float16") else cfg.model.dtype
    tp = ec.tp_size
    weights = -(-total_params(shape) // tp) * dtype_bytes(dtype)
    per_token = kv_bytes_per_token(shape, dtype, tp)
    if ec.kind not in MEMORY_SHARE_FLAGS:  # embedded: its KV slots
        kv = ec.max_total_tokens * per_token
        return EngineMemory("embedded", weights, kv, ec.max_total_tokens, None)
    name, flag = MEMORY_SHARE_FLAGS[ec.kind]
    share = memory_share(ec)
    if share is None:
        return EngineMemory(name, weights, None, None, None, flag)
    kv = max(0, int(share * gpu_bytes) - weights)
    return EngineMemory(name, weights, kv, kv // per_token, share, flag)


MOMENT_NAMES = {"backward_start": "backward start", "backward_end": "backward end",
                "optimizer_step": "optimizer step"}


def moment_terms(est: MemoryEstimate) -> tuple[str, dict[str, int]]:
    """The peak moment of ``est`` and the terms held at it (they add up to ``est.total``)."""
    moment = max(est.moments, key=est.moments.get)
    grads = est.grads if moment != "backward_start" or est.accumulating else 0
    terms = {"weights": est.weights, "grads": grads, "AdamW": est.adam}
    terms |= {"backward_start": {"gathered params": est.gathered + est.gather_buffers,
                                 "activations": est.activations, "log-probs": est.logprobs},
              "backward_end": {"gathered params": est.gathered,
                               "grads being reduced": est.block_grads + est.root_grads},
              "optimizer_step": {"AdamW temporary": est.optimizer_temps}}[moment]
    return MOMENT_NAMES[moment], {k: v for k, v in terms.items() if v}


def gib(n: float) -> str:
    """Bytes as GiB: one decimal, two under 1 GiB (a small model's terms)."""
    return f"{n / GIB:.1f}" if n >= GIB else f"{n / GIB:.2f}"


def memory_lines(cfg: RunConfig) -> list[str]:
    """``areal-like plan``'s memory block for a laid-out GPU job (``launch.job.laid_out``: the
    shares set); [] for a job on CPUs. Per kind of GPU (the trainer's, an engine's, the one both
    share) its estimate against ``launch.gpu_memory_gb``."""
    from launch.placement import engine_on_gpu, place_nodes, trainer_on_gpu

    nodes = place_nodes(cfg)
    if nodes is None:
        return []
    size = cfg.launch.gpu_memory_gb
    head = f"memory per GPU, estimated for launch.gpu_memory_gb={size:g} (launch/memory.py):"
    try:
        shape = model_shape(cfg.model)
        trainer = trainer_memory(cfg, shape) if trainer_on_gpu(cfg) else None
    except NoEstimate as e:
        return [head, f"  no estimate: {e}"]
    engine = (engine_memory(cfg, shape, int(size * GIB))
              if engine_on_gpu(cfg) and cfg.rollout.engine.kind != "url" else None)
    lines = [head]
    if trainer is not None:
        lines.append(_trainer_line(cfg, trainer))
        if isinstance(shape, MixtureShape):
            lines.append(_experts_line(cfg, shape, trainer))
    if engine is not None:
        lines.append(_engine_line(cfg, engine, size))
    shared = any(n.shared for n in nodes)
    ctx = int(CUDA_CONTEXT_GIB * GIB)
    if shared:
        lines.append(_verdict("GPU 0 (trainer and engine)",
                              [trainer.total, engine.total, 2 * ctx], size,
                              f" (the trainer's, the engine's, {2 * CUDA_CONTEXT_GIB:g} for "
                              "two CUDA contexts)"))
        return lines
    if trainer is not None:
        lines.append(_verdict("each trainer GPU", [trainer.total, ctx], size,
                              f" (with {CUDA_CONTEXT_GIB:g} for the CUDA context)"))
    if engine is not None:
        held = engine.weights if engine.share is None else int(engine.share * size * GIB)
        lines.append(_verdict("each engine GPU", [held, ctx], size,
                              " (its weights; the engine sizes its KV cache in the rest)"
                              if engine.share is None else f" (its {engine.flag}, with "
                              f"{CUDA_CONTEXT_GIB:g} for the CUDA context)"))
    return lines


def _trainer_line(cfg: RunConfig, t: TrainerMemory) -> str:
    tr = cfg.trainer
    moment, terms = moment_terms(t.estimate)
    terms |= t.extra
    what = ", ".join(f"{k} {gib(v)}" for k, v in terms.items())
    how = (f"{t.ranks} rank{'s' * (t.ranks != 1)}, {t.tokens} tokens a micro-batch, "
           f"{cfg.model.dtype}"
           + (f", LoRA rank {tr.lora.rank} on a {cfg.model.dtype} base" if tr.lora.enabled else "")
           + (", activation checkpointing" if tr.activation_checkpointing else ""))
    return f"  trainer  {gib(t.total)} GiB a rank ({how}): {what}, at its peak ({moment})"


def _experts_line(cfg: RunConfig, shape: MixtureShape, t: TrainerMemory) -> str:
    """The gathered block and the peak per rank with and without expert parallelism."""
    n, e, c = cfg.trainer.expert_parallel, shape.num_experts, dtype_bytes(cfg.model.dtype)
    whole = f"{gib(gathered_block_params(shape) * c)} GiB a gathered block"
    if n == 1:
        return (f"  experts  not split (trainer.expert_parallel=1): every rank gathers each "
                f"block's {e} experts, {whole}")
    without = trainer_memory(cfg, shape, expert_parallel=1).total
    return (f"  experts  {n}-way expert parallel: a rank gathers {e // n} of each block's {e} "
            f"experts, {gib(gathered_block_params(shape, n) * c)} GiB a gathered block, per-rank "
            f"peak {gib(t.total)} GiB; without EP {whole}, per-rank peak {gib(without)} GiB")


def _engine_line(cfg: RunConfig, e: EngineMemory, size: float) -> str:
    tp = cfg.rollout.engine.tp_size
    split = f", tp={tp}" if tp > 1 else ""
    if e.kv_cache is None:
        return (f"  engine   {e.name}{split}: weights {gib(e.weights)} GiB a GPU; {e.flag} unset: "
                "the engine sizes its KV cache itself")
    kv = f"KV cache {gib(e.kv_cache)} (about {e.kv_tokens:,} tokens)"
    if e.share is None:
        return f"  engine   {e.name}: {gib(e.total)} GiB: weights {gib(e.weights)}, {kv}"
    if e.kv_cache == 0:
        kv = (f"no room for a KV cache: raise rollout.engine.{cfg.rollout.engine.kind}.{e.flag} "
              "or use a smaller model")
    return (f"  engine   {e.name}{split}: {gib(e.share * size * GIB)} GiB a GPU ({e.flag}="
            f"{e.share:g} of {size:g}): weights {gib(e.weights)}, {kv}")


def _verdict(which: str, parts: list[int], size: float, why: str) -> str:
    used = sum(parts) / GIB
    spare = size - used
    fits = (f"fits, {spare:.1f} GiB spare" if spare >= 0
            else f"does NOT fit, {-spare:.1f} GiB over")
    return (f"  {which}: {' + '.join(gib(p) for p in parts)} = {used:.1f} of {size:g} GiB{why}: "
            f"{fits}")
