"""Weights straight into each rank's shards: a meta-device model, sharded, then materialised.

From ``model.path`` each rank reads only its slice of each safetensors tensor (``get_slice``).
From the config the values are ``areal_like.weights.hf.build_model``'s for ``model.init_seed``, bit
for bit on any number of ranks: rank 0 builds that model once and broadcasts it parameter by
parameter (``broadcast_init``). LoRA: base weights under their HF names, adapters LoRA's init.

A checkpoint's names go through transformers' own conversion for the model (``from_pretrained``'s:
per-expert tensors fused into one parameter, renamed keys). Non-persistent buffers are recomputed
on ``device`` by the model's own ``_init_weights``; any other buffer is refused by name.

Invariant: from a checkpoint, peak host memory is one full parameter (a fused parameter: its
sources and itself), never an unsharded model. A model built from the config (tests, tiny models,
training from scratch) is whole on rank 0 once, while it is broadcast.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from areal_like.settings.config import ModelConfig
from areal_like.weights.lora import base_name, is_adapter

log = logging.getLogger("trainer.sharded_init")


def broadcast_init(cfg: ModelConfig, params: dict[str, torch.Tensor],
                   device: torch.device) -> None:
    """``build_model(cfg)``'s values (``cfg.init_seed``) into ``params`` (name -> parameter or
    DTensor): rank 0 builds the model once, each parameter is broadcast from it and every rank
    keeps its own rows."""
    from areal_like.weights.hf import build_model

    rank0 = dist.get_rank() == 0
    full = build_model(cfg, dtype="float32").state_dict() if rank0 else {}
    missing = sorted(set(params) - set(full)) if rank0 else []
    if missing:
        raise ValueError(f"the model built from the config has no parameters {missing}")
    for name, param in params.items():  # the same order on every rank (one module tree)
        tensor = (full.pop(name).to(device) if rank0
                  else torch.empty(param.shape, dtype=torch.float32, device=device))
        if dist.get_world_size() > 1:
            dist.broadcast(tensor, src=0)
        write_shard(param, tensor)


def local_slices(param: torch.Tensor) -> tuple[slice, ...]:
    """The index of this rank's shard of ``param`` in the full tensor
    (all of it if not a DTensor)."""
    if not isinstance(param, DTensor):
        return tuple(slice(0, n) for n in param.shape)
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh,
                                                          param.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def write_shard(param: torch.Tensor, full_or_slice: torch.Tensor,
                already_sliced: bool = False) -> None:
    """Copy this rank's rows of a full CPU tensor (or the rows already read)
    into ``param``'s shard."""
    local = param.to_local() if isinstance(param, DTensor) else param
    src = full_or_slice if already_sliced else full_or_slice[local_slices(param)]
    if tuple(src.shape) != tuple(local.shape):
        raise ValueError(f"shard shape {tuple(local.shape)} != source slice {tuple(src.shape)}")
    with torch.no_grad():
        local.copy_(src)


def load_safetensors(model: torch.nn.Module, params: dict[str, torch.Tensor],
                     directory: Path) -> None:
    """Each parameter's rank-local rows from the ``*.safetensors`` files of ``directory``, the
    checkpoint's names converted by transformers' own mapping for ``model`` (the one
    ``from_pretrained`` applies: renamed keys, and per-expert tensors fused into one parameter).
    A renamed tensor is read as its shard; a fused one is built whole (its sources, then the
    result), converted by transformers' operations, then sliced."""
    from contextlib import ExitStack

    from safetensors import safe_open
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model.path={str(directory)!r} has no *.safetensors files: the trainer "
                         "loads safetensors only (save the model with "
                         "save_pretrained(safe_serialization=True))")
    index = directory / "model.safetensors.index.json"
    if index.is_file():  # a sharded checkpoint: read only the files the index names
        names = set(json.loads(index.read_text())["weight_map"].values())
        files = [f for f in files if f.name in names]
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    fused: dict[str, WeightConverter] = {}  # target name -> its converter, collecting sources
    done, unexpected = set(), []
    with ExitStack() as stack:
        for f in files:
            sf = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
            for key in sf.keys():
                name, pattern = rename_source_key(key, renamings, converters,
                                                  getattr(model, "base_model_prefix", None),
                                                  params)
                if name not in params:
                    unexpected.append(key)
                elif pattern is None:
                    write_shard(params[name], sf.get_slice(key)[local_slices(params[name])],
                                already_sliced=True)
                    done.add(name)
                else:  # read when its target is converted, in the checkpoint's order
                    fused.setdefault(name, copy.deepcopy(by_pattern[pattern])).add_tensor(
                        name, key, pattern, functools.partial(sf.get_tensor, key))
        for first, converter in fused.items():
            for name, value in converter.convert(first, model=model,
                                                 config=model.config).items():
                write_shard(params[name], value[0] if isinstance(value, list) else value)
                done.add(name)
    missing = sorted(set(params) - done)
    if missing:
        raise ValueError(f"model.path={str(directory)!r} lacks {len(missing)} weight(s): "
                         f"{missing[:8]}")
    if unexpected:
        log.warning("model.path=%s: %d tensor(s) not in the model ignored: %s", directory,
                    len(unexpected),
                    unexpected[:8])


def init_adapters(params: dict[str, torch.Tensor], seed: int) -> None:
    """LoRA's initialisation (PEFT's default): A Kaiming-uniform, B zero: the adapted model starts
    as its base. A is drawn full on CPU from its own generator, in name order: the same on any
    number of ranks."""
    gen = torch.Generator().manual_seed(seed)
    for name in sorted(params):
        full = torch.zeros(params[name].shape)
        if ".lora_A." in name:
            torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=gen)
        write_shard(params[name], full.to(params[name].dtype))


def foreign_buffers(model: torch.nn.Module) -> list[str]:
    """The buffers ``restore_buffers`` cannot recompute, one entry per module: persistent ones
    (a checkpoint's, which the trainer does not read) and non-floating ones."""
    out = []
    for mod_name, module in model.named_modules():
        own = module.named_buffers(recurse=False)
        if bad := sorted(n for n, b in own if n not in module._non_persistent_buffers_set
                         or not b.is_floating_point()):
            out.append(f"buffers {bad} of {mod_name} ({type(module).__name__})")
    return out


def restore_buffers(model: torch.nn.Module) -> None:
    """Recompute the non-persistent buffers ``to_empty`` left uninitialised (rotary tables, a
    scaled embedding's ``embed_scale``) with the model's own ``_init_weights``, as
    ``from_pretrained`` does for what a checkpoint lacks: transformers' init functions skip a
    tensor marked ``_is_hf_initialized``, so each module's parameters are marked first and only
    its buffers are written. A buffer it leaves unwritten is refused by name."""
    from transformers import initialization

    if foreign := foreign_buffers(model):
        raise ValueError(f"cannot materialise {foreign[0]} from the meta device")
    owners = [(name, m) for name, m in model.named_modules()
              if next(m.buffers(recurse=False), None) is not None]
    with initialization.guard_torch_init_functions():
        for _, module in owners:
            for buf in module.buffers(recurse=False):
                buf.fill_(math.nan)  # what _init_weights does not write stays NaN
            kept = list(module.parameters(recurse=False))
            for p in kept:
                p._is_hf_initialized = True
            try:
                model._init_weights(module)
            finally:
                for p in kept:
                    del p._is_hf_initialized
    unset = [f"{name}.{b}" for name, m in owners for b, t in m.named_buffers(recurse=False)
             if t.isnan().any()]
    if unset:
        raise ValueError(f"cannot materialise buffers {unset} from the meta device: the model's "
                         "_init_weights does not compute them")


def materialize(model: torch.nn.Module, cfg: ModelConfig, device: torch.device) -> torch.nn.Module:
    """Allocate ``model``'s (sharded) parameters on ``device`` and fill them from ``cfg.path`` or
    with ``cfg.init_seed``'s initialisation; returns ``model``."""
    model.to_empty(device=device)
    if (not any(isinstance(p, DTensor) for p in model.parameters())
            and hasattr(model, "tie_weights")):
        # not sharded (one rank): to_empty gave each module its own meta -> device copy
        model.tie_weights()
    named = dict(model.named_parameters())  # a tied parameter appears once, under its first name
    params = {base_name(n): p for n, p in named.items() if not is_adapter(n)}  # Hugging Face names
    if cfg.path:
        load_safetensors(model, params, Path(cfg.path))
    else:
        broadcast_init(cfg, params, device)
    init_adapters({n: p for n, p in named.items() if is_adapter(n)}, cfg.init_seed)
    with torch.no_grad():
        restore_buffers(model)
    return model
