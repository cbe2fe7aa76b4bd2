"""Attention over packed sequences (``sdpa_packed``): one row holds several sequences, each
attending causally inside itself only.

A micro-batch's boundaries are a ``Packing``, built once per micro-batch on the host from the
sequence lengths (trainer/step.py's ``packed_output_logp``, whose one read-back of the lengths is
the micro-batch's only host sync): the offsets ``cu_seqlens`` on the device (as flash-attention's
variable-length kernels read them), the longest length as a Python int, the position ids, and,
for the exact SDPA path, the row positions per length (built on first use, then shared by every
layer, forward and backward). No layer reads anything back from the device. The decoder gets it
as transformers' flash kwargs (``cu_seq_lens_q``, ``max_length_q``, ...) plus ``packing``.

Per call, with boundaries:

* CUDA, bf16/fp16: torch's variable-length flash kernel (``torch.nn.attention.varlen``, torch
  >= 2.10; grouped-query attention and backward native), one launch per layer;
* otherwise (CPU, fp32; a sliding window on torch 2.10): causal SDPA per sequence, sequences
  of one length batched (``sum(l_i^2)`` scores, not transformers' dense ``[L, L]`` mask), with a
  backward that recomputes each group's attention from q, k, v, so the attention output is held
  once per layer (trainer/MEMORY.md section 1).

A sliding-window layer (``sliding_window``) keeps its window inside each sequence on both paths.
Without boundaries it is transformers' SDPA, unchanged. ``flash_attention_implementations``
names the flash-attention packages installed here as transformers' implementations.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "sdpa_packed"
VARLEN_DTYPES = (torch.bfloat16, torch.float16)

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch: the SDPA path everywhere
    varlen_attn = None
# torch 2.10 took ``is_causal``, later ones a ``window_size`` ((-1, 0): causal); 2.12 added
# ``enable_gqa`` (before it, fewer KV heads went to the flash kernel, which takes them, unchecked)
_PARAMS = inspect.signature(varlen_attn).parameters if varlen_attn is not None else {}
_WINDOWED, _GQA_FLAG = "window_size" in _PARAMS, "enable_gqa" in _PARAMS


def _varlen_mask(window: int | None) -> dict | None:
    """``varlen_attn``'s causal (and sliding-window) arguments; None where this torch has none
    for ``window`` (2.10: no windows)."""
    if _WINDOWED:  # a token sees itself and the window - 1 before it, as transformers' mask
        return {"window_size": (window - 1 if window else -1, 0)}
    return None if window else {"is_causal": True}


@dataclass
class Packing:
    """One packed row's sequences (lengths ``lens``, in order), for every layer of one forward.

    Build with ``Packing.of``; the device tensors are copied from host tensors without waiting
    (``non_blocking``: a pageable source is staged at once, so this is safe)."""

    lens: tuple[int, ...]
    cu_seqlens: torch.Tensor  # [n + 1] int32 on the device: sequence i is cu[i]:cu[i + 1]
    position_ids: torch.Tensor  # [1, L] on the device: positions restart at 0 per sequence
    max_len: int
    _groups: list[torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, lens: list[int] | tuple[int, ...], device: torch.device) -> Packing:
        lens = tuple(int(n) for n in lens)
        if not lens or min(lens) < 1:
            raise ValueError(f"packed sequences need lengths >= 1, got {list(lens)}")
        host_lens = torch.tensor(lens, dtype=torch.int32)
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        torch.cumsum(host_lens, 0, out=cu[1:])
        pos = torch.cat([torch.arange(n) for n in lens])[None]
        return cls(lens, cu.to(device, non_blocking=True), pos.to(device, non_blocking=True),
                   max(lens))

    def decoder_kwargs(self) -> dict:
        """What a transformers decoder's forward takes for this row (flash kwargs included)."""
        return {"position_ids": self.position_ids, "cu_seq_lens_q": self.cu_seqlens,
                "cu_seq_lens_k": self.cu_seqlens, "max_length_q": self.max_len,
                "max_length_k": self.max_len, "packing": self}

    def groups(self, device: torch.device) -> list[torch.Tensor]:
        """Per length, the row positions [m, l] of that length's sequences (built once)."""
        if self._groups is None:
            by_len: dict[int, list[int]] = {}
            start = 0
            for n in self.lens:
                by_len.setdefault(n, []).append(start)
                start += n
            self._groups = [(torch.tensor(starts)[:, None] + torch.arange(n)).to(
                device, non_blocking=True) for n, starts in by_len.items()]
        return self._groups


def _causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            scaling: float | None, window: int | None = None) -> torch.Tensor:
    """Causal SDPA of sequences of one length, [m, H, l, D] -> [m, H, l, D]; with ``window``
    each token sees itself and the ``window - 1`` tokens before it (a sliding-window layer)."""
    n = query.shape[-2]
    if window is None or window >= n:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                              enable_gqa=True)
    seen = torch.ones(n, n, dtype=torch.bool, device=query.device)
    band = seen.tril() & ~seen.tril(-window)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=band, scale=scaling,
                                          enable_gqa=True)


def _stack(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Row positions ``idx`` [m, l] of ``t`` [1, H, L, D] as a batch [m, H, l, D] (a copy)."""
    return t[0][:, idx].transpose(0, 1)


class _SegmentedAttention(torch.autograd.Function):
    """Causal SDPA on each sequence of the row (batched by length) into one [1, L, H, D] output;
    backward recomputes each group's attention from q, k, v."""

    @staticmethod
    def forward(ctx, query, key, value, groups: list[torch.Tensor], scaling: float | None,
                window: int | None):
        b, h, n, d = query.shape
        out = query.new_empty(b, n, h, d)
        for idx in groups:
            o = _causal(_stack(query, idx), _stack(key, idx), _stack(value, idx), scaling, window)
            out[0, idx.flatten()] = o.transpose(1, 2).reshape(-1, h, d)
        ctx.save_for_backward(query, key, value)
        ctx.groups, ctx.scaling, ctx.window = groups, scaling, window
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value = ctx.saved_tensors
        grads = [torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)]
        for idx in ctx.groups:
            with torch.enable_grad():
                qkv = [_stack(t, idx).detach().requires_grad_() for t in (query, key, value)]
                o = _causal(*qkv, ctx.scaling, ctx.window)
                part = torch.autograd.grad(o, qkv, grad_out[0, idx].transpose(1, 2))
            for g, p in zip(grads, part):
                g[0][:, idx.flatten()] = p.transpose(0, 1).reshape(g.shape[1], -1, g.shape[3])
        return *grads, None, None, None


@functools.cache
def _flash_capable(device_index: int) -> bool:
    """The varlen kernel is flash-attention 2's: Ampere (sm80) or newer."""
    return torch.cuda.get_device_capability(device_index)[0] >= 8


def uses_varlen_kernel(query: torch.Tensor) -> bool:
    """Whether a packed call on ``query`` runs torch's variable-length flash kernel."""
    return (varlen_attn is not None and query.is_cuda and query.dtype in VARLEN_DTYPES
            and query.shape[-1] <= 256 and query.shape[-1] % 8 == 0
            and _flash_capable(query.device.index or 0))


def packed_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                scaling: float | None = None, cu_seq_lens_q: torch.Tensor | None = None,
                max_length_q: int | None = None, packing: Packing | None = None,
                sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature, q/k/v [1, H, L, D] -> [1, L, H, D]. Packed when
    ``packing`` (``Packing.decoder_kwargs``) is given; the ``attention_mask`` is not read then,
    and a sliding-window layer's ``sliding_window`` bounds each sequence's causal window."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, sliding_window=sliding_window, **kwargs)
    if packing is None:
        raise ValueError("sdpa_packed needs the row's Packing (trainer/packed_attention.py) with "
                         "cu_seq_lens_q: its boundaries are never read back from the device")
    if dropout:
        raise ValueError("packed attention has no attention dropout (the backward recomputes it)")
    if uses_varlen_kernel(query) and (mask := _varlen_mask(sliding_window)) is not None:
        if _GQA_FLAG:
            mask["enable_gqa"] = query.shape[1] != key.shape[1]
        out = varlen_attn(query[0].transpose(0, 1), key[0].transpose(0, 1),
                          value[0].transpose(0, 1), packing.cu_seqlens, packing.cu_seqlens,
                          packing.max_len, packing.max_len, scale=scaling, **mask)
        return out[None], None
    if len(packing.lens) == 1:  # one sequence: SDPA's own output, no copy
        return _causal(query, key, value, scaling, sliding_window).transpose(1, 2), None
    return _SegmentedAttention.apply(query, key, value, packing.groups(query.device),
                                     scaling, sliding_window), None


def _distributions(module: str) -> set[str]:
    """Normalised names of the installed distributions that provide top-level ``module``."""
    names = importlib.metadata.packages_distributions().get(module, [])
    return {n.lower().replace("_", "-") for n in names}


def flash_attention_implementations() -> list[str]:
    """transformers' names of the flash-attention implementations whose package is installed here
    (CUDA not checked). ``flash_attn`` is two projects' module: ``flash-attn`` (FA2, a regular
    package; its wheel carries a ``flash_attn/cute`` folder too) and ``flash-attn-4`` (installed
    with SGLang), which owns only the ``flash_attn/cute`` namespace package: importable
    ``flash_attn`` alone says nothing about FA2. By distribution where one provides the module,
    else by the package's form: ``flash_attention_2`` for a regular ``flash_attn``,
    ``flash_attention_4`` for a namespace one holding ``cute``; ``flash_attention_3`` for
    ``flash_attn_interface``."""
    out = []
    spec = importlib.util.find_spec("flash_attn")
    dists = _distributions("flash_attn") if spec is not None else set()
    namespace = spec is not None and spec.origin in (None, "namespace")
    if spec is not None and ("flash-attn" in dists or (not dists and not namespace)):
        out.append("flash_attention_2")
    if importlib.util.find_spec("flash_attn_interface") is not None:
        out.append("flash_attention_3")
    if "flash-attn-4" in dists or (
            namespace and not dists and importlib.util.find_spec("flash_attn.cute") is not None):
        out.append("flash_attention_4")
    return out


AttentionInterface.register(PACKED_SDPA, packed_sdpa)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)  # for the unpacked fallback
