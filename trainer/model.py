"""The trainable policy: process group, FSDP2-sharded model, AdamW, LR schedule, gradient clipping.

Owns: the default process group of the trainer world (``init_distributed``) and the ``Policy``
bundle (model, optimizer, scheduler), and the frozen reference policy of the KL term
(``build_reference``).

Building (``shard_model``): the model is built on the meta device, each decoder block is
(optionally) set to recompute its activations in backward (``trainer.activation_checkpointing``)
and ``fully_shard``-ed, then the root; only then are the parameters allocated, each rank holding
its own shards, and filled from ``model.path`` or with ``model.init_seed``'s initialisation
(``trainer/sharded_init.py``). No rank ever holds a full copy of the model.

Precision (one switch, ``model.dtype``): master weights, gradients and AdamW states are always
fp32. With ``model.dtype=bfloat16`` (or float16) FSDP2's ``MixedPrecisionPolicy`` casts the
all-gathered parameters to that dtype for forward/backward (``param_dtype``) and reduces gradients
in fp32 (``reduce_dtype``), on any device and any world size, one rank included (a one-rank mesh:
the cast is what FSDP2 is there for); log-probs are always taken in fp32 (``trainer/logprobs.py``).
FSDP2 on one rank, not autocast: the arithmetic of the sharded run (autocast would keep norms and
residual adds in fp32; one vs two CPU ranks in bf16: equal losses to 1e-7, weights to bf16
rounding), and it casts each parameter once per forward where autocast casts at every use. A CPU
step of ``model=small`` (6M): 0.41 s with FSDP2, 0.46 s with autocast (``model=tiny``: 62 vs 58 ms).

Log-probs: ``policy_logprobs(model, ...)`` runs the decoder and then the chunked lm_head of
``trainer/logprobs.py``; it is registered as an FSDP forward method on the root, so the root's
parameters (embeddings, final norm, lm_head) are all-gathered around it as for ``forward``.

Invariants:
- FSDP2 only (``fully_shard`` per decoder block, then the root). FSDP1 does not run on CPU
  (torch 2.13 refuses: "FSDP needs a non-CPU accelerator device"). A single process (plain
  ``python -m trainer``, or torchrun with one rank) joins a world-size-1 gloo group; with
  ``model.dtype=float32`` its model is NOT sharded: plain parameters, no FSDP hooks, no DTensor
  dispatch. On a world of one FSDP2 then has nothing to shard, reduce or cast and its per-op
  bookkeeping cost ~20 ms of a ~100 ms small-model step (benchmarks/README.md); every consumer
  of the parameters (``full_tensor``, ``to_local``, DCP, the forward method) accepts both plain
  tensors and DTensors, and the loss and weights equal the sharded run's
  (tests/integration/test_trainer_invariance.py; bf16 on one rank: test_trainer_bf16.py).
- AdamW runs its multi-tensor (``foreach``) implementation also on CPU (torch picks it only for
  CUDA by default): one kernel per op over all parameters instead of one per parameter; same
  arithmetic.
- Parameter names are the unwrapped Hugging Face names (neither ``fully_shard`` nor
  ``checkpoint_blocks`` renames), so the weight-sync plan names match what an engine's
  ``load_weights`` expects.
- The initial weights equal ``areal_like.weights.hf.build_model``'s bit for bit, for any world size.
- LoRA (``trainer.lora.rank`` > 0): PEFT's layers are injected into the meta model before
  sharding (names: areal_like/weights/lora.py), the base is frozen, only the adapters' A and B get
  gradients and AdamW state; the reference is the same model with the adapters off.
- The reference is the run's INITIAL weights (``trainer.ref_path``, else ``model.path`` or the
  config-built model with its init seed), never the policy's: resuming does not move it. It is
  sharded like the policy, frozen (no optimizer, no gradients, eval mode) and only built when
  ``trainer.loss.kl_coef`` > 0.
- FSDP2 *averages* gradients over ranks; ``trainer/step.py`` scales the local loss by the world
  size so the reduced gradient equals the single-process gradient of the global loss.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import types
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from areal_like.net.distributed import free_port, set_nccl_nonblocking_timeout
from areal_like.settings.config import LoraConfig, ModelConfig, TrainerConfig
from areal_like.weights.hf import build_meta_model, torch_dtype
from areal_like.weights.lora import ADAPTER, add_adapters
from trainer.logprobs import hidden_token_logprobs
from trainer.packed_attention import PACKED_SDPA
from trainer.sharded_init import materialize


@dataclass
class Policy:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    rank: int
    world_size: int


def init_distributed(trainer_cfg: TrainerConfig) -> tuple[int, int]:
    """Join (or create) the trainer's default process group; returns (rank, world_size).

    Under torchrun the env:// rendezvous is used. Without it, a world-size-1 gloo group on a free
    loopback port. On CUDA the group has both backends (gloo for CPU objects such as the batch
    broadcast, NCCL for tensors on the GPU). Before any group: NCCL's wait for a communicator is
    bounded by the weight-sync deadline (areal_like/net/distributed.py,
    set_nccl_nonblocking_timeout).
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    set_nccl_nonblocking_timeout(trainer_cfg.weight_sync.deadline_s)
    timeout = timedelta(seconds=trainer_cfg.gloo_timeout_s)
    backend = "cpu:gloo,cuda:nccl" if trainer_cfg.device.startswith("cuda") else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
        if trainer_cfg.device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def leave_distributed() -> None:
    """Leave the default process group after the work every rank shares: a barrier first, so that no
    rank tears its group down while another still uses it (gloo aborts the slower process then:
    ``terminate called without an active exception``), then destroy it."""
    if not dist.is_initialized():
        return
    if dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def trainer_device(trainer_cfg: TrainerConfig) -> torch.device:
    if trainer_cfg.device.startswith("cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(trainer_cfg.device)


def mixed_precision(model_cfg: ModelConfig):
    """FSDP2's policy: compute in ``model.dtype`` with fp32 gradient reduction; None (all fp32) when
    ``model.dtype`` is float32. The same on every device and world size (module docstring)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if model_cfg.dtype == "float32":
        return None
    # bf16 compute, fp32 gradient reduction: the usual recipe (torchtitan, verl).
    return MixedPrecisionPolicy(param_dtype=torch_dtype(model_cfg.dtype),
                                reduce_dtype=torch.float32)


def apply_fsdp(model: torch.nn.Module, model_cfg: ModelConfig) -> torch.nn.Module:
    """``fully_shard`` each decoder block, then the root (embeddings, final norm, lm_head)."""
    from torch.distributed.fsdp import fully_shard

    mp = mixed_precision(model_cfg)
    kwargs = {"mp_policy": mp} if mp is not None else {}
    for block in model.model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """``model`` in eval mode for a pass that only measures (the proximal and reference log-probs,
    the log-prob guard): no dropout (``trainer.lora.dropout``), as in the engines; then as it was."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def policy_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                    temperature: float, chunk_tokens: int,
                    cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """log pi(input_ids[:, p + 1] | input_ids[:, :p + 1]) [n, T] (fp32) for each position p in
    ``positions`` [n, T]: the final hidden states at those positions through the chunked lm_head.
    Right padding + causal attention: no attention mask needed.

    Packed (``input_ids`` [1, L] the sequences concatenated, sequence i at ``cu_seqlens[i] :
    cu_seqlens[i + 1]``): attention stays inside each sequence, positions restart at 0. The
    boundaries go to the attention function (``trainer/packed_attention.py``; flash-attention's
    variable-length kernel reads the same keywords) and, as restarting ``position_ids``, to
    transformers' mask, which is block-diagonal for them (``find_packed_sequence_indices``) only
    without a KV cache: with one (``use_cache`` on, as a built model's config has it) it is plain
    causal and, on plain SDPA, sequences attend to their neighbours (measured: hidden states off
    by ~3 on the tiny model), hence ``use_cache=False`` here, whatever the config. An attention
    that reads the boundaries itself gets no mask at all (``packed_mask``)."""
    decoder = model.get_decoder()
    if cu_seqlens is None:
        hidden = decoder(input_ids=input_ids).last_hidden_state
    else:
        lens = cu_seqlens.diff()
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
        position_ids = (position_ids - cu_seqlens[:-1].repeat_interleave(lens))[None]
        longest = int(lens.max())
        hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                         attention_mask=packed_mask(model, decoder),
                         cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens,
                         max_length_q=longest, max_length_k=longest).last_hidden_state
    picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
    targets = input_ids.gather(1, positions + 1)
    return hidden_token_logprobs(picked, output_weight(model), targets, temperature,
                                 chunk_tokens=chunk_tokens)


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """The lm_head weight the forward uses: with a LoRA adapter on ``lm_head`` (in
    ``trainer.lora.target_modules``) the base plus PEFT's ``get_delta_weight`` (differentiable;
    one [vocab, hidden] temporary), unless the adapters are off (the KL reference). Read by
    attribute: a run without LoRA never imports peft."""
    head = model.get_output_embeddings()
    lora_a = getattr(head, "lora_A", None)  # PEFT's LoraLayer: lora_A, disable_adapters, get_delta_weight
    if lora_a is not None and ADAPTER in lora_a and not head.disable_adapters:
        return head.weight + head.get_delta_weight(ADAPTER)
    return head.weight


# Attention implementations that keep packed sequences apart from ``cu_seq_lens_q`` alone
VARLEN_ATTENTION = (PACKED_SDPA, "flash_attention_2", "flash_attention_3")


def packed_mask(model: torch.nn.Module, decoder: torch.nn.Module) -> dict | None:
    """The mask argument of a packed forward: for an attention in ``VARLEN_ATTENTION`` (and no
    sliding-window layers), "no mask" handed over as transformers' precomputed mapping, so it
    does not build the dense [L, L] block-diagonal one it never reads (at L = 4,096 a 16 MiB
    mask, 48 MiB at the peak of building it; measured); else None (the mask is built from the
    restarting position ids: the attention reads it)."""
    if model.config._attn_implementation in VARLEN_ATTENTION and not getattr(
            decoder, "has_sliding_layers", False):
        return {"full_attention": None}
    return None


def attach_logprobs(model: torch.nn.Module) -> torch.nn.Module:
    """``model.policy_logprobs(input_ids, positions, temperature, chunk_tokens[, cu_seqlens])``,
    run under FSDP's pre/post-forward hooks of the root (a no-op registration on a model that is
    not sharded)."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    model.policy_logprobs = types.MethodType(policy_logprobs, model)
    register_fsdp_forward_method(model, "policy_logprobs")
    return model


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Recompute each decoder block's activations in backward: torch's non-reentrant ``checkpoint``
    around the block's ``forward`` (what torch's ``checkpoint_wrapper`` does, without the wrapper
    module that would rename every parameter). Call before ``fully_shard``: FSDP2's hooks run in
    the block's ``__call__``, outside the recompute. Not transformers' own switch: 5.23 renamed it
    (``activation_checkpointing_enable``, which 5.19 lacks) and deprecated the old name."""
    for block in model.model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def shard_model(model_cfg: ModelConfig, trainer_cfg: TrainerConfig, *, dtype: str = "float32",
                checkpointing: bool = False, lora: LoraConfig | None = None) -> torch.nn.Module:
    """The model of ``model_cfg`` sharded over the default process group (on a world of one only
    for ``model.dtype``'s mixed precision), built on the meta device and materialised shard by
    shard on the trainer device, parameters in ``dtype``; with ``lora`` enabled, LoRA adapters on
    the frozen base (areal_like/weights/lora.py)."""
    device = trainer_device(trainer_cfg)
    model = build_meta_model(model_cfg, dtype)
    if lora is not None and lora.enabled:  # before sharding: FSDP2 groups a block's adapter with it
        add_adapters(model, lora)
    model.config.use_cache = False
    if model.config._attn_implementation == "sdpa":  # the same SDPA, per sequence when packed
        model.set_attn_implementation(PACKED_SDPA)
    if checkpointing:
        checkpoint_blocks(model)
    # One fp32 rank: nothing to shard, gather, reduce or cast (module docstring).
    if dist.get_world_size() > 1 or mixed_precision(model_cfg) is not None:
        apply_fsdp(model, model_cfg)
    materialize(model, model_cfg, device)
    return attach_logprobs(model)


def build_reference(model_cfg: ModelConfig, trainer_cfg: TrainerConfig,
                    policy: Policy | None = None) -> torch.nn.Module:
    """The frozen reference policy, sharded like the policy (requires the default process group).

    With LoRA (``trainer.lora.rank`` > 0) it is ``policy``'s own model: its frozen base is the
    initial weights, and ``trainer.step.reference_logp`` runs it with the adapter switched off;
    no second copy.

    Its parameters are stored in ``model.dtype``: the policy's forward casts its fp32 master
    weights to that dtype anyway (FSDP2 mixed precision), so the reference computes the same
    numbers with half the memory. Its values are the fp32 initial weights cast, as the policy's
    are (a model initialised directly in bf16 draws different values).
    """
    if trainer_cfg.lora.enabled:
        return policy.model
    cfg = replace(model_cfg, path=trainer_cfg.ref_path) if trainer_cfg.ref_path else model_cfg
    model = shard_model(cfg, trainer_cfg, dtype=model_cfg.dtype)
    model.requires_grad_(False)
    return model.eval()


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier on the base LR after ``step`` optimizer steps: linear warmup, then the schedule."""

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine

    return f


def build_policy(model_cfg: ModelConfig, trainer_cfg: TrainerConfig, *, adam_eps: float = 1e-8) -> Policy:
    """Build (or load) the sharded fp32 model on the trainer device and make its optimizer.

    Requires the default process group (``init_distributed``). ``adam_eps`` is exposed for tests
    that compare updated weights across shardings (a larger eps makes Adam's first step linear in
    the gradient instead of a sign function that amplifies float rounding near zero).
    """
    device = trainer_device(trainer_cfg)
    model = shard_model(model_cfg, trainer_cfg, checkpointing=trainer_cfg.activation_checkpointing,
                        lora=trainer_cfg.lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
    optimizer = torch.optim.AdamW(trainable, lr=trainer_cfg.lr, betas=tuple(trainer_cfg.betas),
                                  weight_decay=trainer_cfg.weight_decay, eps=adam_eps, foreach=True)
    # The optimizer step count is the number of AdamW steps (num_minibatches per policy version).
    total = trainer_cfg.steps * trainer_cfg.num_minibatches
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(trainer_cfg.lr_schedule, trainer_cfg.warmup_steps * trainer_cfg.num_minibatches, total))
    return Policy(model, optimizer, scheduler, device, dist.get_rank(), dist.get_world_size())


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (DTensor-aware; a collective) and return the pre-clip norm."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a full CPU tensor, on every rank (a collective: all ranks must call it)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = t.detach().to("cpu", torch.float32).clone()
    return out

