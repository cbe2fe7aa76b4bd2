"""Expert parallelism (``trainer.expert_parallel`` = N > 1): each mixture layer's experts live on N
ranks, num_experts / N on each, and every token travels to the rank holding its expert and back.

Placement: the ranks form a (world / N, N) mesh named ("edp", "ep"); ranks kN .. kN + N - 1 are one
EP group. Each fused experts parameter (transformers 5's ``gate_up_proj`` [E, 2I, H] and
``down_proj`` [E, H, I]) is a DTensor sharded on dim 0 over "ep" (rank i of a group holds experts
i E/N .. (i + 1) E/N - 1), and the experts module is its own FSDP2 unit over "edp" (the ranks that
hold the same experts). The router and everything else is sharded over all ranks, as without EP.
Being DTensors, the experts reach checkpoints (DCP reshards them to any layout), exports and weight
pushes whole: ``full_tensor`` gathers them in the engines' layout.

Dispatch, per mixture layer: the router's (token, expert) pairs sorted by expert; one all-to-all
of the counts, one of the token rows, the local experts' MLP on what arrived, one all-to-all back;
then, on the token's own rank, the routing weights and the sum over its experts, added in the
order the unsplit module adds them (ascending expert), without atomics.

Gradient scale: each rank backpropagates world x its loss and FSDP2 averages over ranks, so an
unsplit parameter's gradient is the sum of the ranks' losses' gradients. A local expert gets the
gradients of its whole EP group's tokens (N ranks) and FSDP2 averages only over "edp": N times
too much. The return trip's backward scales by 1 / N (expert gradients) and the outbound trip's
backward by N (the tokens' gradients, back to what they were).
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from areal_like.weights.routing import fused_experts
from trainer.ranks import local


def shard_experts(model: nn.Module, n: int, device_type: str, fsdp_kwargs: dict) -> None:
    """Place each experts module's parameters on their EP ranks and make it an FSDP2 unit over
    "edp" (module docstring). Before the blocks' ``fully_shard``, on the meta device."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    mesh = _mesh(device_type, dist.get_world_size(), n)
    ep = mesh["ep"]
    for m in fused_experts(model):
        for name, p in list(m.named_parameters(recurse=False)):
            part = p.detach().chunk(n, 0)[ep.get_local_rank()]
            m.register_parameter(name, nn.Parameter(DTensor.from_local(
                part, ep, [Shard(0)], run_check=False), requires_grad=p.requires_grad))
        m.ep_group, m.ep_size = ep.get_group(), n
        m.forward = types.MethodType(ep_forward, m)
        fully_shard(m, mesh=mesh["edp"], **fsdp_kwargs)


@functools.cache
def _mesh(device_type: str, world: int, n: int):
    """The (world / N, N) mesh, made once a process (the policy and a KL reference share it)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world // n, n), mesh_dim_names=("edp", "ep"))


class _Exchange(torch.autograd.Function):
    """``all_to_all_single`` of rows, ``send[i]`` rows to rank i of ``group`` and ``recv[i]`` from
    it; the backward sends the gradient back the same way, times ``grad_scale``."""

    @staticmethod
    def forward(ctx, x, recv: list[int], send: list[int], group, grad_scale: float):
        ctx.back = (send, recv, group, grad_scale)
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send, recv, group, scale = ctx.back
        out = grad.new_empty((sum(send), *grad.shape[1:]))
        dist.all_to_all_single(out, (grad * scale).contiguous(), send, recv, group=group)
        return out, None, None, None, None


def ep_forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor,
               top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts module's forward under EP: ``hidden`` [T, H], ``top_k_index`` and
    ``top_k_weights`` [T, k] -> [T, H] (module docstring, "Dispatch")."""
    gate_up, down, n = local(self.gate_up_proj), local(self.down_proj), self.ep_size
    per_rank, k = gate_up.shape[0], top_k_index.shape[1]
    flat = top_k_index.reshape(-1)
    order = flat.argsort(stable=True)  # (token, expert) pairs by expert, then token
    token = order // k
    counts = torch.bincount(flat, minlength=per_rank * n)
    got = torch.empty_like(counts)  # got[s * per_rank + e]: rows rank s sends my expert e
    dist.all_to_all_single(got, counts, group=self.ep_group)
    send, recv = counts.view(n, per_rank).sum(1).tolist(), got.view(n, per_rank).sum(1).tolist()
    x = _Exchange.apply(hidden[token], recv, send, self.ep_group, float(n))
    expert = torch.arange(per_rank, device=x.device).repeat(n).repeat_interleave(got)
    by_expert = expert.argsort(stable=True)
    ys = []
    for e, rows in enumerate(x[by_expert].split(got.view(n, per_rank).sum(0).tolist())):
        gate, up = F.linear(rows, gate_up[e]).chunk(2, dim=-1)
        ys.append(F.linear(self.act_fn(gate) * up, down[e]))
    y = torch.cat(ys)[by_expert.argsort()]  # back in arrival order
    y = _Exchange.apply(y, send, recv, self.ep_group, 1.0 / n)
    y = y * top_k_weights.reshape(-1)[order, None]
    # back to [T, k, H] in (token, slot) order, then each token's sum in ascending expert order,
    # the unsplit module's order (a sum, not index_add's atomics: the same bits on every run)
    pairs = torch.empty_like(y).index_copy(0, order, y).view(*top_k_index.shape, -1)
    pairs = pairs.gather(1, top_k_index.argsort(1)[..., None].expand_as(pairs))
    out = torch.zeros_like(hidden)
    for j in range(k):
        out = out + pairs[:, j].to(hidden.dtype)
    return out


@contextlib.contextmanager
def expert_load(model: nn.Module, into: dict):
    """While open, count the tokens each mixture layer routes to each expert; on close put
    ``moe_expert_load_max`` in ``into``: over layers, the busiest expert's tokens over the mean
    per expert (1.0: balanced; a collective with several ranks). A dense model: nothing."""
    experts = fused_experts(model)
    counts: list = [None] * len(experts)  # per layer: tokens per expert, on the model's device

    def hook(i: int, n: int):
        def count(_module, args):
            if len(args) < 2:  # a forward that routes inside (not the Qwen3-MoE layout)
                return
            got = torch.bincount(args[1].reshape(-1), minlength=n)[:n].double()
            counts[i] = got if counts[i] is None else counts[i] + got
        return count

    handles = [m.register_forward_pre_hook(hook(i, m.num_experts)) for i, m in enumerate(experts)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
    if counts and all(c is not None for c in counts):
        total = torch.stack(counts)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
        into["moe_expert_load_max"] = float((total.max(1).values
                                             / total.mean(1).clamp(min=1e-9)).max())
