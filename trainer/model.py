"""The trainable policy: process group, FSDP2-sharded model, AdamW, LR schedule, gradient clipping.

The build, precision and memory argument is in trainer/MEMORY.md (section 1).

Invariants:
- Built on the meta device, each decoder block (optionally checkpointed) then the root
  ``fully_shard``-ed, then materialised shard by shard (``trainer/sharded_init.py``): no rank
  ever holds a full copy. The initial weights equal ``areal_like.weights.hf.build_model``'s bit
  for bit, for any world size.
- Master weights, gradients and AdamW states are fp32; ``model.dtype`` bf16/fp16 is FSDP2's
  ``MixedPrecisionPolicy`` (fp32 reduction) on any world size, one rank included (not autocast:
  the sharded run's arithmetic). One rank whose weights are held in ``model.dtype`` (fp32, or a
  LoRA base) is NOT sharded (plain parameters; every consumer accepts tensors and DTensors;
  tests/integration/test_trainer_invariance.py); its fp32 adapters compute in fp32.
- Parameter names are the unwrapped Hugging Face names, so weight-sync names match what an
  engine's ``load_weights`` expects.
- LoRA: adapters injected before sharding, base frozen, only A and B train; the reference is the
  same model with the adapters off. The frozen base is held in ``model.dtype`` (``base_dtype``:
  bf16 on the GPU topologies, fp32 on CPU's), the adapters and their AdamW state in fp32.
  Otherwise the reference is the run's INITIAL weights, sharded
  like the policy, frozen, built only when ``trainer.loss.kl_coef`` > 0.
- FSDP2 averages gradients over ranks; ``trainer/step.py`` scales the local loss by the world size.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import types
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from areal_like.net.distributed import gloo_toward, set_nccl_nonblocking_timeout
from areal_like.settings.config import LoraConfig, ModelConfig, TrainerConfig
from areal_like.weights.hf import build_meta_model, layer_windows, torch_dtype
from areal_like.weights.lora import ADAPTER, add_adapters, is_adapter
from areal_like.weights.routing import expert_parallel_problem, fused_experts
from trainer.experts import shard_experts
from trainer.logprobs import hidden_token_logprobs
from trainer.packed_attention import PACKED_SDPA, Packing, flash_attention_implementations
from trainer.ranks import full
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

    torchrun's env:// rendezvous, else a world-size-1 group on an in-process store (a TCPStore
    would listen on every interface, to anyone: areal_like/SECURITY.md). On CUDA both backends
    (gloo for CPU objects, NCCL for tensors)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    set_nccl_nonblocking_timeout(trainer_cfg.weight_sync.deadline_s)
    timeout = timedelta(seconds=trainer_cfg.gloo_timeout_s)
    backend = "cpu:gloo,cuda:nccl" if trainer_cfg.device.startswith("cuda") else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        # the interface toward torchrun's master, not the one the host's name resolves to
        with gloo_toward(os.environ.get("MASTER_ADDR")):
            dist.init_process_group(backend, timeout=timeout)
        if trainer_cfg.device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def leave_distributed() -> None:
    """Barrier, then destroy the default group: no rank tears it down while another still uses
    it (gloo aborts the slower process then)."""
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
    """FSDP2's policy: compute in ``model.dtype``, reduce in fp32; None for float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if model_cfg.dtype == "float32":
        return None
    return MixedPrecisionPolicy(param_dtype=torch_dtype(model_cfg.dtype),
                                reduce_dtype=torch.float32)


def apply_fsdp(model: torch.nn.Module, model_cfg: ModelConfig,
               expert_parallel: int = 1, device_type: str = "cpu") -> torch.nn.Module:
    """``fully_shard`` each decoder block, then the root (embeddings, final norm, lm_head); with
    ``expert_parallel`` > 1 the experts first (trainer/experts.py)."""
    from torch.distributed.fsdp import fully_shard

    mp = mixed_precision(model_cfg)
    kwargs = {"mp_policy": mp} if mp is not None else {}
    if expert_parallel > 1:
        shard_experts(model, expert_parallel, device_type, kwargs)
    for block in model.model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """``model`` in eval mode (no LoRA dropout) for a pass that only measures; then as it was."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def policy_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                    temperature: float, chunk_tokens: int,
                    packing: Packing | None = None, head: str = "chunked") -> torch.Tensor:
    """log pi(input_ids[:, p + 1] | input_ids[:, :p + 1]) [n, T] (fp32) for each position p in
    ``positions`` [n, T], through the lm_head (``head``: trainer/logprobs.py's). Right padding +
    causal: no mask needed.

    Packed (``input_ids`` [1, L], sequence i at ``packing.cu_seqlens[i] : [i + 1]``, built once
    per micro-batch: trainer/packed_attention.py): attention stays inside each sequence,
    positions restart at 0. ``use_cache=False`` whatever the config: with a cache transformers'
    mask is plain causal and sequences attend to their neighbours."""
    decoder, picked = model.get_decoder(), None
    # the training forward of a mixture with trainer.router_aux_loss_coef > 0: its router logits
    aux = ({"output_router_logits": True}
           if model.training and torch.is_grad_enabled() and router_aux(model) else {})
    config = model.config
    if (packing is not None and layer_windows(config) is not None
            and config._attn_implementation not in VARLEN_ATTENTION):
        # sliding windows outside the packed kernels (eager: GPT-OSS's sinks) are masks
        # transformers builds per row (not every such model finds packed sequences in the
        # positions): the sequences run as right-padded rows
        cu_seqlens = packing.cu_seqlens.long()
        rows = torch.nn.utils.rnn.pad_sequence(input_ids[0].split(list(packing.lens)),
                                               batch_first=True)
        row = torch.searchsorted(cu_seqlens, positions[0], right=True) - 1
        out = decoder(input_ids=rows, **aux)
        picked = out.last_hidden_state[row, positions[0] - cu_seqlens[row]][None]
    elif packing is None:  # "no mask" where the attention is causal without one: no host sync
        out = decoder(input_ids=input_ids, attention_mask=packed_mask(model), **aux)
    else:  # the packed kernels keep each layer's window inside each sequence
        out = decoder(input_ids=input_ids, use_cache=False,
                      attention_mask=packed_mask(model, packed=True), **packing.decoder_kwargs(),
                      **aux)
    if aux:  # read (and cleared) by trainer/step.py's forward_backward
        c = model.config
        experts = getattr(c, "num_experts", None) or c.num_local_experts  # GPT-OSS's name
        model.router_aux_loss = router_aux(model)(out.router_logits, experts,
                                                  c.num_experts_per_tok)
    if picked is None:
        hidden = out.last_hidden_state
        picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
    targets = input_ids.gather(1, positions + 1)
    return hidden_token_logprobs(picked, output_weight(model), targets, temperature,
                                 chunk_tokens=chunk_tokens, head=head)


def router_aux(model: torch.nn.Module):
    """The load-balancing loss function of ``model``'s transformers module when
    ``model.router_aux_loss_coef`` > 0 (``build_policy``), else None."""
    if getattr(model, "router_aux_loss_coef", 0.0) <= 0:
        return None
    return getattr(sys.modules[type(model).__module__], "load_balancing_loss_func", None)


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """The lm_head weight the forward uses: plus PEFT's delta when a LoRA adapter on ``lm_head``
    is on (off: the KL reference). Read by attribute: a run without LoRA never imports peft."""
    head = model.get_output_embeddings()
    # PEFT's LoraLayer: lora_A, disable_adapters, get_delta_weight
    lora_a = getattr(head, "lora_A", None)
    if lora_a is not None and ADAPTER in lora_a and not head.disable_adapters:
        # in the base's dtype (the hidden states'): an unsharded bf16 base beside fp32 adapters
        return (head.weight + head.get_delta_weight(ADAPTER)).to(head.weight.dtype)
    return head.weight


# Attention implementations that keep packed sequences apart from ``cu_seq_lens_q`` alone
# (transformers' names; ``flash_attention_4``: the ``flash-attn-4`` package SGLang installs)
FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
VARLEN_ATTENTION = (PACKED_SDPA, *FLASH_ATTENTION)


def packed_mask(model: torch.nn.Module, packed: bool = False) -> dict | None:
    """The mask argument of a packed or right-padded causal forward: "no mask" for each layer type
    as transformers' precomputed mapping, for an attention in ``VARLEN_ATTENTION`` (no dense
    [L, L] mask it would never read, and no search of the positions for packed rows: a host
    sync), where the model takes a mapping (a config with ``layer_types``; Llama's and
    Qwen3-MoE's forwards take none) and where no layer needs the mask for its window (a padded
    row of a sliding-window model does; a packed one does not: the kernels keep windows);
    else None (transformers builds the mask)."""
    config = model.config
    types = getattr(config, "layer_types", None)
    if config._attn_implementation not in VARLEN_ATTENTION or types is None:
        return None
    if layer_windows(config) is not None and not packed:
        return None
    return dict.fromkeys(types)


def attach_logprobs(model: torch.nn.Module) -> torch.nn.Module:
    """``model.policy_logprobs(...)``, run under the root's FSDP forward hooks."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    model.policy_logprobs = types.MethodType(policy_logprobs, model)
    register_fsdp_forward_method(model, "policy_logprobs")
    return model


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Recompute each decoder block's activations in backward: non-reentrant ``checkpoint`` around
    ``forward`` (no wrapper module, so no renamed parameters). Call before ``fully_shard``."""
    for block in model.model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def compile_blocks(model: torch.nn.Module, backend: str = "inductor") -> None:
    """``torch.compile`` each decoder block in place (``Module.compile``: parameter names stay
    Hugging Face's), as torchtitan does per block: FSDP2's hooks stay between the blocks, and one
    compiled block serves every layer (the same code, recompiled only for new shapes). Call after
    ``checkpoint_blocks`` (the recompute is traced with the block) and before ``fully_shard``."""
    for block in model.model.layers:
        block.compile(backend=backend)


def adamw_options(device: torch.device) -> dict:
    """AdamW's implementation: CUDA's fused kernel (one launch for all parameters, DTensors
    included), else the multi-tensor ``foreach`` one (CPU: the runs tests compare bit for bit)."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its own dropout off (``nn.Dropout`` layers, a config.json's
    ``attention_dropout``): the engines sample without it, so the training forward must be the
    policy they sampled from (pi_theta / pi_prox = 1 at a step's start, VESPO's and VCPO's
    sequence weights on the same numbers). LoRA's dropout (``trainer.lora.dropout``) is added
    after, and stays."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    return model


def require_attention(impl: str) -> None:
    """Refuse a flash implementation whose package is not installed here, before any weight is
    built: ``flash_attention_2`` where only ``flash-attn-4`` provides ``flash_attn`` (an SGLang
    install) fails deep in transformers' import of FA2 otherwise. (``sdpa`` runs as
    ``sdpa_packed``: the same SDPA unpacked; packed, torch's varlen flash kernel on CUDA.)"""
    if impl in FLASH_ATTENTION and impl not in (found := flash_attention_implementations()):
        raise ValueError(f"model.attn_implementation={impl}: its package is not installed here "
                         f"(flash attention found: {', '.join(found) or 'none'}); use one of "
                         "those, or sdpa (packed: torch's varlen kernel on CUDA)")


def shard_model(model_cfg: ModelConfig, trainer_cfg: TrainerConfig, *, dtype: str = "float32",
                checkpointing: bool = False, lora: LoraConfig | None = None) -> torch.nn.Module:
    """The model of ``model_cfg``, sharded (module docstring), parameters in ``dtype``."""
    device = trainer_device(trainer_cfg)
    require_attention(model_cfg.attn_implementation)
    model = without_dropout(build_meta_model(model_cfg, dtype))
    if lora is not None and lora.enabled:  # before sharding: FSDP2 groups a block's adapter with it
        add_adapters(model, lora)
        for name, p in model.named_parameters():  # trained: fp32 whatever the base's dtype
            if is_adapter(name):
                p.data = p.data.float()
    model.config.use_cache = False
    if model.config._attn_implementation == "sdpa":  # the same SDPA, per sequence when packed
        model.set_attn_implementation(PACKED_SDPA)
    if checkpointing:
        checkpoint_blocks(model)
    if trainer_cfg.compile_blocks:
        compile_blocks(model)
    # one rank is sharded only for FSDP2's cast of fp32 weights to a lower model.dtype; one held in
    # model.dtype already (a LoRA base, a KL reference) computes as it is, gathering nothing
    # a dense model beside a mixture policy (a critic, a KL reference) runs without EP
    ep = trainer_cfg.expert_parallel if fused_experts(model) else 1
    if problem := expert_parallel_problem(ep, model, dist.get_world_size()):
        raise ValueError(problem)
    if dist.get_world_size() > 1 or (mixed_precision(model_cfg) is not None
                                     and dtype == "float32"):
        apply_fsdp(model, model_cfg, ep, device.type)
    materialize(model, model_cfg, device)
    return attach_logprobs(model)


def build_reference(model_cfg: ModelConfig, trainer_cfg: TrainerConfig,
                    policy: Policy | None = None) -> torch.nn.Module:
    """The frozen reference policy; with LoRA ``policy``'s own model (run with the adapter off).
    Stored in ``model.dtype``: the same numbers as the policy's cast forward, half the memory."""
    if trainer_cfg.lora.enabled:
        return policy.model
    cfg = replace(model_cfg, path=trainer_cfg.ref_path) if trainer_cfg.ref_path else model_cfg
    model = shard_model(cfg, trainer_cfg, dtype=model_cfg.dtype)
    model.requires_grad_(False)
    return model.eval()


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier on the base LR after ``step`` optimizer steps:
    linear warmup, then the schedule."""

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


def base_dtype(model_cfg: ModelConfig, trainer_cfg: TrainerConfig) -> str:
    """The dtype the policy's weights are held in: fp32 master weights when they train; with LoRA
    the frozen base in ``model.dtype``, the dtype every forward casts it to anyway (FSDP2's
    mixed precision), so the numbers are the same and a bf16 base takes half the memory (a 7B
    base: 14.2 GiB, not 28.4; trainer/MEMORY.md)."""
    return model_cfg.dtype if trainer_cfg.lora.enabled else "float32"


def build_policy(model_cfg: ModelConfig, trainer_cfg: TrainerConfig, *,
                 adam_eps: float = 1e-8) -> Policy:
    """Build (or load) the sharded model (fp32 master weights; LoRA: ``base_dtype``) and its
    optimizer. ``adam_eps``: for tests comparing weights across shardings (a larger eps keeps
    Adam's first step linear in the gradient)."""
    device = trainer_device(trainer_cfg)
    model = shard_model(model_cfg, trainer_cfg, dtype=base_dtype(model_cfg, trainer_cfg),
                        checkpointing=trainer_cfg.activation_checkpointing, lora=trainer_cfg.lora)
    model.router_aux_loss_coef = trainer_cfg.router_aux_loss_coef
    if model.router_aux_loss_coef > 0 and router_aux(model) is None:
        raise ValueError(f"trainer.router_aux_loss_coef={model.router_aux_loss_coef}: "
                         f"{type(model).__name__} is not a mixture of experts transformers gives "
                         "a load-balancing loss")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
    optimizer = torch.optim.AdamW(trainable, lr=trainer_cfg.lr, betas=tuple(trainer_cfg.betas),
                                  weight_decay=trainer_cfg.weight_decay, eps=adam_eps,
                                  **adamw_options(device))
    # The optimizer step count is the number of AdamW steps (num_minibatches per policy version).
    total = trainer_cfg.steps * trainer_cfg.num_minibatches
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(trainer_cfg.lr_schedule,
                             trainer_cfg.warmup_steps * trainer_cfg.num_minibatches, total))
    return Policy(model, optimizer, scheduler, device, dist.get_rank(), dist.get_world_size())


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (DTensor-aware; a collective) and return the pre-clip norm.
    Per device mesh, then combined: expert parallelism's experts live on a mesh of their own
    (trainer/experts.py), and DTensor ops take one mesh at a time."""
    by_mesh: dict = {}
    for p in model.parameters():
        if p.grad is not None:
            by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    norms = [full(torch.nn.utils.get_total_norm([p.grad for p in ps])) for ps in by_mesh.values()]
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    for ps in by_mesh.values():
        torch.nn.utils.clip_grads_with_norm_(ps, max_norm, total)
    return float(total)
