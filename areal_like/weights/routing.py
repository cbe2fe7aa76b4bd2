"""Routing replay for mixture-of-experts models: record the experts a forward routed each token to,
and run a forward that routes to given experts instead (rollout routing replay: the trainer
reuses the engine's choices, so its log-probs of a mixture follow the experts that sampled).

Routes are int arrays ``[tokens, layers, top_k]``: row r is the r-th token the routers see in a
forward (the input ``[B, S]`` flattened row-major: a packed row's tokens in order), column l
the l-th router in ``model.modules()`` order (the decoder layers' order).

Supported routers: the top-k softmax router of Qwen3-MoE and Qwen2-MoE (transformers 5:
``weight`` [E, H], ``top_k``, ``norm_topk_prob``; it returns ``(logits, weights, indices)``).
Replayed, the weights are the softmax of the router's own logits gathered at the given experts
(renormalised over them as ``norm_topk_prob`` says): the gradient reaches the chosen experts'
logits, exactly as the router's own top-k would give it when the choices agree.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROUTER_CLASSES = ("Qwen3MoeTopKRouter", "Qwen2MoeTopKRouter")
# the experts modules expert parallelism splits (their forward's layout: trainer/experts.py)
EP_EXPERTS = ("Qwen3MoeExperts",)


def routers(model: nn.Module) -> list[nn.Module]:
    """The model's replayable routers in layer order; [] for a dense model. ValueError for a
    mixture whose router this module cannot replay."""
    found = [m for m in model.modules() if _class_name(m) in ROUTER_CLASSES]
    if not found and getattr(model.config, "num_experts_per_tok", 0):
        raise ValueError(f"routing replay supports the routers {', '.join(ROUTER_CLASSES)}; "
                         f"{type(model).__name__} has none of them")
    return found


def _class_name(m: nn.Module) -> str:
    # FSDP2 puts its own class over a sharded module: the model's class is the next one
    cls = type(m)
    return cls.__mro__[1].__name__ if cls.__name__.startswith("FSDP") else cls.__name__


def route_shape(model: nn.Module) -> tuple[int, int]:
    """(layers, top_k) of one token's route; ValueError for a model without replayable routers."""
    found = routers(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no mixture-of-experts router to replay")
    return len(found), int(found[0].top_k)


@contextmanager
def recording(model: nn.Module) -> Iterator[list[Tensor]]:
    """Every forward inside appends its routes ``[tokens, layers, top_k]`` (int64, on the
    model's device) to the yielded list."""
    found = routers(model)
    per_layer: list[Tensor | None] = [None] * len(found)
    out: list[Tensor] = []

    def hook(layer: int):
        def record(_module, _args, result):
            per_layer[layer] = result[2].detach()
            if layer == len(found) - 1:
                out.append(torch.stack(per_layer, dim=1))
        return record

    handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(found)]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


@contextmanager
def replaying(model: nn.Module, routes: Tensor) -> Iterator[None]:
    """Forwards inside route token r of layer l to the experts ``routes[r, l]``; each forward must
    see exactly ``routes.shape[0]`` tokens (ValueError otherwise)."""
    found = routers(model)
    if routes.dim() != 3 or routes.shape[1:] != (len(found), found[0].top_k if found else 0):
        raise ValueError(f"routes {tuple(routes.shape)} do not match the model's "
                         f"[tokens, {len(found)} layers, top_k]")
    for layer, router in enumerate(found):
        router.forward = _replayed(router, routes[:, layer].long())
    try:
        yield
    finally:
        for router in found:
            del router.forward


def _replayed(router: nn.Module, chosen: Tensor):
    def forward(hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = hidden_states.reshape(-1, router.hidden_dim)
        if h.shape[0] != chosen.shape[0]:
            raise ValueError(f"routing replay: the forward has {h.shape[0]} tokens, the routes "
                             f"{chosen.shape[0]}")
        logits = F.linear(h, router.weight)
        probs = torch.softmax(logits, dtype=torch.float, dim=-1)
        idx = chosen.to(h.device, non_blocking=True)
        weights = probs.gather(-1, idx)
        if router.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(logits.dtype), idx
    return forward


def fused_experts(model: nn.Module) -> list[nn.Module]:
    """The mixture layers' experts modules whose experts are fused into 3-D parameters
    (transformers 5's ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]), in layer order."""
    return [m for m in model.modules() if hasattr(m, "num_experts")
            and getattr(m, "gate_up_proj", None) is not None and m.gate_up_proj.dim() == 3]


def expert_parallel_problem(n: int, model: nn.Module, world: int | None) -> str | None:
    """Why ``trainer.expert_parallel=n`` cannot split ``model`` over ``world`` trainer ranks of a
    node (None: not known yet), or None when it can (trainer/experts.py)."""
    key = f"trainer.expert_parallel={n}"
    experts = fused_experts(model)
    if n == 1:
        return None
    if not experts or _class_name(experts[0]) not in EP_EXPERTS:
        return (f"{key}: {type(model).__name__} is not a mixture of experts whose experts "
                f"the trainer splits ({', '.join(EP_EXPERTS)}); use 1")
    e = experts[0].num_experts
    if e % n:
        return f"{key} does not divide the model's num_experts={e}; use a divisor of {e}"
    if world is not None and world % n:
        return (f"{key} does not divide the trainer's ranks on a node ({world}, "
                f"launch.trainer_ranks); use a divisor of both {e} and {world}")
    return None
