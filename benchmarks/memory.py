"""Trainer memory: an estimate of peak bytes per GPU from the model's shape, and a measurement of
the tensor bytes a piece of code allocates.

``estimate_peak_bytes`` is the accounting behind ``trainer/MEMORY.md``: what one trainer rank holds
at the peak of a step under FSDP2 (``trainer/model.py``): its 1/world share of the fp32 master
weights, gradients and two AdamW moments, plus the transient terms of the largest of three
moments: the start of backward (the gradients of an earlier micro-batch of the same optimizer
step, when there is one; the root group and two decoder blocks all-gathered in compute
dtype, twice, as FSDP2 frees an all-gather's flat output only at the next all-gather; the
activations kept for backward -- every block's, or only the block inputs with activation
checkpointing plus one block recomputed -- and the log-prob working set: one ``[chunk, vocab]``
block, ``trainer/logprobs.py``, and lm_head's gradient), the end of backward (the root group's
gradients being reduced) and the optimizer step (foreach AdamW's temporary, the square root of
the second moment). It leaves out the
CUDA context, the allocator's fragmentation and NCCL buffers (a few GiB in practice: leave
headroom). ``benchmarks/bench_trainer_memory.py`` checks it against a measured step.

``PeakTensorBytes`` measures, on any device, the peak of the bytes held by tensors created while
it is active (a dispatch mode: every op's output storage is counted until it is freed). Tensors
that existed before it started are not counted, so it measures what a computation ADDS.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

from areal_like.settings.config import ModelConfig
from areal_like.settings.schema import LORA_DEFAULT_TARGETS

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


def block_params(cfg: ModelConfig) -> int:
    """Parameters of one Qwen2 decoder block: q/k/v (with bias), o, gate/up/down, two RMSNorms."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    return (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h


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
    the attention's fp32 log-sum-exp add 3H + heads + 2."""
    h, i, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    hd = h // heads
    kv = cfg.num_key_value_heads * hd
    units = 8 * h + 4 * i + 2 * kv + 2 * hd + heads + 2
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


def _activation_bytes(cfg: ModelConfig, t: int, c: int, checkpointing: bool, per_block: int) -> int:
    """The activations kept for backward at ``t`` tokens: every block's ``per_block`` (or the block
    inputs plus one block recomputed, checkpointed), then the final norm, the gathered hidden
    states and the token ids."""
    if checkpointing:
        acts = cfg.num_hidden_layers * t * cfg.hidden_size * c + t * per_block
    else:
        acts = cfg.num_hidden_layers * t * per_block
    return acts + t * cfg.hidden_size * (4 * c if c == 4 else 4 * c + 8) + 32 * t


def _plain_tensors(leaves) -> list[torch.Tensor]:
    """The plain tensors among ``leaves``, a wrapper subclass (DTensor) replaced by its inner
    tensors: its own op runs below this mode, so its local allocation is only visible through its
    output."""
    out = []
    for t in leaves:
        if is_traceable_wrapper_subclass(t):
            out += _plain_tensors([getattr(t, name) for name in t.__tensor_flatten__()[0]])
        elif type(t) is torch.Tensor and t.device.type != "meta":
            out.append(t)
    return out


class PeakTensorBytes(TorchDispatchMode):
    """``with PeakTensorBytes() as m: ...``; then ``m.peak`` (bytes) and ``m.current`` (still
    alive).

    Counts each output storage once, from its creation until its Python object is collected
    (storages keep their Python object alive as long as any tensor views them). Tensor
    subclasses (DTensor) are counted through the local tensors they wrap.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: weakref.WeakSet = weakref.WeakSet()

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in _plain_tensors(tree_leaves(out)):
            s = t.untyped_storage()
            if s in self._seen:
                continue
            self._seen.add(s)
            n = s.nbytes()
            self.current += n
            weakref.finalize(s, self._free, n)
        self.peak = max(self.peak, self.current)
        return out


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
                        accumulating: bool = True) -> MemoryEstimate:
    """Peak memory of one trainer rank in a step: FSDP2 over ``world`` ranks, ``micro_batch_tokens``
    tokens per forward/backward, compute in ``dtype`` (fp32 master weights). ``accumulating``: an
    optimizer step takes more than one micro-batch, so an earlier one's gradients are held when a
    backward starts (with one, none are: the step frees them, ``zero_grad(set_to_none=True)``)."""
    c = 4 if dtype == "float32" else 2
    # mixed precision: the fp32 copy a bf16 gradient is reduced in / upcast to
    mp = 4 if c != 4 else 0
    p, blk, root = total_params(model_cfg), block_params(model_cfg), root_params(model_cfg)
    t, h, v = micro_batch_tokens, model_cfg.hidden_size, model_cfg.vocab_size
    acts = _activation_bytes(model_cfg, t, c, checkpointing, block_activation_bytes(model_cfg, c))
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
                             base_dtype: str = "float32", checkpointing: bool = False,
                             logprob_chunk: int = 512, accumulating: bool = True) -> MemoryEstimate:
    """``estimate_peak_bytes`` with LoRA adapters of ``rank`` on ``targets`` (``trainer.lora``):
    the frozen base is held in ``base_dtype`` with no gradient or AdamW state; the adapters hold
    fp32 weights, gradients, two moments and AdamW's temporary. The trainer's base is fp32, its
    compute fp32 or, with ``model.dtype=bfloat16``, bf16; ``dtype`` and ``base_dtype`` both
    ``bfloat16`` say what a bf16 base would give, not what the trainer runs.
    The ranks gather (FSDP2) when ``world`` > 1 or the compute dtype is not the base's (mixed
    precision); one rank computing in its base's dtype gathers nothing. Frozen embeddings and
    lm_head: no root gradients, no lm_head gradient accumulator; the final norm, frozen too, keeps
    no normalised input. The KL reference (the policy with its adapters off) is a no-grad forward:
    its transients are not counted, as the full model's reference is not."""
    c, b = (4 if d == "float32" else 2 for d in (dtype, base_dtype))
    mp = 4 if c != 4 else 0
    blk_a = adapter_block_params(model_cfg, rank, targets)
    a = model_cfg.num_hidden_layers * blk_a
    p, blk, root = total_params(model_cfg), block_params(model_cfg), root_params(model_cfg)
    t, v = micro_batch_tokens, model_cfg.vocab_size
    per_block = lora_block_activation_bytes(model_cfg, c, rank, targets)
    acts = _activation_bytes(model_cfg, t, c, checkpointing, per_block)
    acts -= t * model_cfg.hidden_size * c  # the frozen final norm keeps no normalised input
    logprobs = min(logprob_chunk, t) * v * (4 + c * (mp > 0))
    shard_p, shard_a = -(-p // world), -(-a // world)
    gathered = (root + 2 * (blk + blk_a)) * c if world > 1 or c != b else 0
    return MemoryEstimate(weights=b * shard_p + 4 * shard_a, grads=4 * shard_a, adam=8 * shard_a,
                          gathered=gathered, gather_buffers=gathered, block_grads=blk_a * (c + mp),
                          activations=acts, logprobs=logprobs, root_grads=0,
                          optimizer_temps=4 * shard_a, accumulating=accumulating)


def _fits(off: float, on: float, room: float) -> str:
    return "yes" if off <= room else "with checkpointing" if on <= room else "no"


def lora_markdown_table(ranks: tuple[int, ...] = (8, 64), tokens: int = 4096, seqs: int = 8,
                        seq_len: int = 2048, chunk: int = 512, room_gib: float = 44.0) -> str:
    """The LoRA table of trainer/MEMORY.md: one GPU, ``seqs`` x ``seq_len`` tokens per step in
    micro-batches of ``tokens`` (``trainer.max_tokens_per_micro_batch``), default targets; the
    fp32 base the trainer runs with fp32 and with bf16 compute, and a bf16 base (estimate only),
    each without and with activation checkpointing; whether each fits the ``room_gib`` an 80 GB GPU
    leaves the trainer beside SGLang's default share (README.md: ``mem_fraction_static=0.4``)."""
    lines = ["| model | rank | adapter params | fp32 base, fp32 compute: peak GiB | "
             "with activation checkpointing | fp32 base, bf16 compute | with activation "
             "checkpointing | bf16 base (not supported yet) | with activation checkpointing | "
             f"fits {room_gib:.0f} GiB: fp32 / bf16 compute / bf16 base |", "|---" * 10 + "|"]
    many = seqs * seq_len > tokens
    for name in QWEN2_SHAPES:
        cfg = qwen2_shape(name)
        for rank in ranks:
            cells = [estimate_lora_peak_bytes(cfg, 1, tokens, rank, dtype=d, base_dtype=b,
                                              checkpointing=ck, logprob_chunk=chunk,
                                              accumulating=many).total / GIB
                     for d, b in (("float32", "float32"), ("bfloat16", "float32"),
                                  ("bfloat16", "bfloat16")) for ck in (False, True)]
            a = cfg.num_hidden_layers * adapter_block_params(cfg, rank)
            figures = " | ".join(f"{x:.1f}" for x in cells)
            fits = " / ".join(_fits(*cells[i:i + 2], room_gib) for i in (0, 2, 4))
            lines.append(f"| {name} | {rank} | {a / 1e6:.1f} M | {figures} | {fits} |")
    return "\n".join(lines)


def markdown_table(seqs: int = 8, seq_len: int = 2048, micro_batch_size: int = 8,
                   worlds: tuple[int, ...] = (1, 2, 8),
                   dtype: str = "bfloat16", chunk: int = 512) -> str:
    """The table of trainer/MEMORY.md: peak GiB per GPU for each Qwen2 shape and world size, with
    and without activation checkpointing. A rank trains ceil(seqs / world) sequences, at most
    ``micro_batch_size`` per forward/backward (``trainer/step.py``)."""
    lines = ["| model | params | GPUs | tokens per micro-batch | peak GiB/GPU | "
             "with activation checkpointing "
             "| largest term |", "|---|---|---|---|---|---|---|"]
    for name in QWEN2_SHAPES:
        cfg = qwen2_shape(name)
        for world in worlds:
            tokens = min(micro_batch_size, -(-seqs // world)) * seq_len
            # more than one micro-batch per optimizer step
            many = -(-seqs // world) > micro_batch_size
            plain = estimate_peak_bytes(cfg, world, tokens, dtype, False, chunk, many)
            ckpt = estimate_peak_bytes(cfg, world, tokens, dtype, True, chunk, many)
            terms = {k: v for k, v in vars(plain).items() if k != "accumulating"}
            top = max(terms, key=terms.get)
            lines.append(f"| {name} | {total_params(cfg) / 1e9:.2f} B | {world} | {tokens} | "
                         f"{plain.total / GIB:.1f} | {ckpt.total / GIB:.1f} | "
                         f"{top} ({terms[top] / GIB:.1f}) |")
    return "\n".join(lines)


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


def critic_markdown_table(seqs: int = 8, seq_len: int = 2048, world: int = 8,
                          dtype: str = "bfloat16") -> str:
    """trainer/MEMORY.md's critic table: peak GiB per GPU with a critic of the policy's shape and
    with one of half its layers, beside the policy alone, on ``world`` GPUs."""
    lines = ["| model | GPUs | tokens per micro-batch | policy alone | + critic (same shape) "
             "| + critic (half the layers) | critic's held state |",
             "|---|---|---|---|---|---|---|"]
    tokens = -(-seqs // world) * seq_len
    for name in QWEN2_SHAPES:
        cfg = qwen2_shape(name)
        half = replace(cfg, num_hidden_layers=max(1, cfg.num_hidden_layers // 2))
        many = -(-seqs // world) > 8  # more than trainer.micro_batch_size=8 per step
        same = estimate_critic_peak_bytes(cfg, world, tokens, dtype, accumulating=many)
        small = estimate_critic_peak_bytes(cfg, world, tokens, dtype, accumulating=many,
                                           critic_cfg=half)
        lines.append(f"| {name} | {world} | {tokens} | {same['without_critic'] / GIB:.1f} | "
                     f"{same['peak'] / GIB:.1f} | {small['peak'] / GIB:.1f} | "
                     f"{same['critic_held'] / GIB:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
    print()
    print(lora_markdown_table())
    print()
    print(critic_markdown_table())
