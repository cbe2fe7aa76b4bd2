"""Per-token log-probabilities: pure, fp32, never the whole logits.

Convention shared with the engines (areal_like/DESIGN.md section 2): logp[t] =
log_softmax(logits_t / temperature)[token_t], WITHOUT top-p/top-k truncation. Always fp32 (a bf16
log-softmax is off by ~0.03 nats per token; trainer/LOSSES.md section 0, rule 2).
``hidden_token_logprobs`` applies lm_head ``chunk_tokens`` at a time and recomputes each chunk in
backward: at most one ``[chunk, V]`` fp32 block alive (trainer/MEMORY.md section 1).
``token_logprobs`` takes existing logits in row chunks of at most CHUNK_BYTES.

Two heads (``trainer.logprob_head``): ``chunked`` is the one above, pure PyTorch, on any device;
``fused`` is liger-kernel's fused linear cross entropy (Triton, CUDA only) with reduction none,
which never writes a [chunk, V] fp32 block to memory and recomputes the logits in backward with
each token's own upstream gradient. ``auto`` takes ``fused`` where the tensors are on CUDA and
liger-kernel and Triton import, else ``chunked``. Both take the softmax in fp32 of the logits of
the compute dtype; ``fused`` applies the temperature to the hidden states before the matmul (the
same quotient, but rounded to the compute dtype before the product in bf16).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor

HEADS = ("chunked", "fused", "auto")

# tokens per lm_head chunk (trainer.logprob_chunk_tokens): 512 x 152k vocab is a 300 MiB fp32 block
CHUNK_TOKENS = 512
# fp32 working set per chunk: big enough that per-chunk overhead is negligible, small next to
# the logits of any real batch.
CHUNK_BYTES = 256 * 2**20


def _work_dtype(logits: Tensor) -> torch.dtype:
    # fp32, or fp64 for fp64 input (gradcheck)
    return torch.promote_types(logits.dtype, torch.float32)


def token_logprobs(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, *, chunk_bytes: int = CHUNK_BYTES
) -> Tensor:
    """log pi(token_t | prefix) [B, T] in fp32 (fp64 for fp64 logits) from logits [B, T, V] (any
    float dtype) and tokens [B, T], ``logits[:, t]`` the logits that predicted ``tokens[:, t]``.
    Differentiable w.r.t. ``logits`` (the log-prob guard's probes run it without gradient)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)}")
    rows = max(1, chunk_bytes // (4 * logits.shape[-1]))
    flat, tok = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1, 1).long()
    wd = _work_dtype(logits)
    out = [torch.log_softmax(x.to(wd) / temperature, -1).gather(-1, t).squeeze(-1)
           for x, t in zip(flat.split(rows), tok.split(rows))]
    return torch.cat(out).view(tokens.shape)


def _chunk_logits(h: Tensor, weight: Tensor, temperature: float, wd: torch.dtype) -> Tensor:
    """logits(h) / temperature as ONE fresh [chunk, V] block in ``wd`` (the compute-dtype product is
    upcast in place of a second copy when it already is ``wd``)."""
    logits = h @ weight.t()
    logits = logits if logits.dtype == wd else logits.to(wd)
    return logits if temperature == 1.0 else logits.div_(temperature)


def _accumulate(acc: Tensor, gx: Tensor, h: Tensor) -> None:
    """acc += gx^T @ h: in place when dtypes agree, else the compute-dtype product added in fp32."""
    if acc.dtype == gx.dtype:
        acc.addmm_(gx.t(), h)
    else:
        acc.add_(gx.t() @ h)


class _HiddenTokenLogprob(torch.autograd.Function):
    """log_softmax((h W^T) / temperature)[token] per row of h, ``chunk`` rows at a time, with a
    recomputing backward: d logp / d logits = (1[v = token] - softmax) / temperature, then through
    the matmul to h (``g W``) and W (``g^T h``). Saves its inputs and each row's log-sum-exp, so
    that backward takes the softmax as exp(logits - lse): each pass over a [chunk, V] fp32 block
    costs as much as the chunk's matmul on a GPU (memory-bound), and this saves four of them."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, tokens: Tensor, temperature: float, chunk: int,
                shape: tuple[int, ...]) -> Tensor:
        wd = _work_dtype(hidden)
        # returned as is: not a view (FSDP2 hooks)
        result = torch.empty(shape, dtype=wd, device=hidden.device)
        out = result.view(-1)
        lse = torch.empty(hidden.shape[0], dtype=wd, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            x = _chunk_logits(hidden[s : s + chunk], weight, temperature, wd)
            picked = x.gather(-1, tokens[s : s + chunk, None]).squeeze(-1)
            m = x.amax(-1, keepdim=True)
            # in place: one block
            lse[s : s + chunk] = x.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(-1))
            out[s : s + chunk] = picked - lse[s : s + chunk]
            del x
        ctx.save_for_backward(hidden, weight, tokens, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return result

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, tokens, lse = ctx.saved_tensors
        wd, chunk = _work_dtype(hidden), ctx.chunk
        grad_out = grad_out.reshape(-1)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        # the weight gradient sums over every chunk: accumulate in fp32 (or the fp64 of gradcheck)
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                             device=weight.device) if need_w else None
        g_all = grad_out.to(wd) / ctx.temperature
        for s in range(0, hidden.shape[0], chunk):
            h, g = hidden[s : s + chunk], g_all[s : s + chunk, None]
            x = _chunk_logits(h, weight, ctx.temperature, wd)
            x.sub_(lse[s : s + chunk, None]).exp_().mul_(-g)  # -g / temperature * softmax, in place
            x.scatter_add_(-1, tokens[s : s + chunk, None], g)
            # the logits' gradient in the compute dtype, as autograd would give it
            gx = x.to(weight.dtype)
            del x
            if need_h:
                grad_h[s : s + chunk] = gx @ weight
            if need_w:
                _accumulate(grad_w, gx, h)
            del gx
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None


@functools.cache
def _liger_imports() -> bool:
    """liger-kernel's fused linear cross entropy imports (with its Triton)."""
    if any(importlib.util.find_spec(m) is None for m in ("liger_kernel", "triton")):
        return False
    try:
        import liger_kernel.ops.fused_linear_cross_entropy  # noqa: F401
    except Exception:  # an install that does not import (Triton too old for it): not usable
        return False
    return True


def fused_head_available(device: torch.device | str) -> bool:
    """Whether the ``fused`` head can run on ``device``: a CUDA device, with liger-kernel and
    Triton installed and importing."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available() and _liger_imports()


def resolve_head(head: str, device: torch.device | str) -> str:
    """``chunked`` or ``fused``: ``auto`` is ``fused`` where ``fused_head_available``. ValueError
    for an unknown head, or ``fused`` where it cannot run."""
    if head not in HEADS:
        raise ValueError(f"unknown log-prob head {head!r} (known: {', '.join(HEADS)})")
    if head == "auto":
        return "fused" if fused_head_available(device) else "chunked"
    if head == "fused" and not fused_head_available(device):
        raise ValueError(f"the fused log-prob head needs CUDA, liger-kernel and Triton; on "
                         f"{torch.device(device)} use trainer.logprob_head=chunked or auto")
    return head


def _fused_token_logprobs(hidden: Tensor, weight: Tensor, tokens: Tensor,
                          temperature: float) -> Tensor:
    """liger-kernel's fused linear cross entropy, reduction none, negated: log pi [rows] in fp32;
    the weight gradient accumulated in fp32."""
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    x = hidden if temperature == 1.0 else hidden / temperature
    # (input, weight, target, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing,
    #  reduction, softcap, return_z_loss, accum_dtype)
    loss = LigerFusedLinearCrossEntropyFunction.apply(x, weight, tokens, None, None, -100, 0.0,
                                                      0.0, "none", None, False, torch.float32)[0]
    return -loss


def hidden_token_logprobs(hidden: Tensor, weight: Tensor, tokens: Tensor,
                          temperature: float = 1.0, *,
                          chunk_tokens: int = CHUNK_TOKENS, head: str = "chunked") -> Tensor:
    """log pi(token | prefix) [...] in fp32 from final hidden states ``hidden`` [..., H], the output
    embedding ``weight`` [V, H] (``lm_head.weight``) and ``tokens`` [...]; never more than
    ``chunk_tokens`` rows of logits at a time, forward or backward (``head="chunked"``), or no
    fp32 logits block at all (``"fused"``; ``"auto"``: ``resolve_head``).

    Equal to ``token_logprobs(hidden @ weight.T, tokens, temperature)`` up to matmul rounding;
    differentiable w.r.t. ``hidden`` and ``weight`` (gradients in their dtype).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if hidden.shape[:-1] != tokens.shape or weight.shape[-1] != hidden.shape[-1]:
        raise ValueError(f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and tokens "
                         f"{tuple(tokens.shape)} do not match ([..., H], [V, H], [...])")
    flat = hidden.reshape(-1, hidden.shape[-1])
    if resolve_head(head, hidden.device) == "fused":
        lp = _fused_token_logprobs(flat, weight, tokens.reshape(-1).long(), float(temperature))
        return lp.to(_work_dtype(hidden)).view(tokens.shape)
    return _HiddenTokenLogprob.apply(flat, weight, tokens.reshape(-1).long(), float(temperature),
                                     int(chunk_tokens),
                                     tuple(tokens.shape))
