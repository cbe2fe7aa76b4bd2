"""Per-request sampling parameters and the batched sampler with its logprob convention.

Logprob convention (the contract with the trainer, areal_like/DESIGN.md section 2):
``logprob[t] = log_softmax(logits_t / temperature)[token_t]`` in fp32, before top-p / top-k
truncation, as SGLang returns by default. ``temperature == 0`` is greedy (temperature 1, top_k 1).
Sampling draws ``argmax(p / E)`` with ``E ~ Exp(1)`` i.i.d. per vocabulary entry, an exact sample
from ``p`` that lets each row use its own ``torch.Generator`` (``sampling_seed``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

TOP_K_ALL = 1 << 30  # SGLang's "whole vocabulary" default (1073741824)


@dataclass(kw_only=True, slots=True)
class SamplingParams:
    """What one request asks of the sampler (already validated by ``api.parse_generate``)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = TOP_K_ALL
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    sampling_seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None],
           shared: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row. ``logits``: [B, V] (any dtype). Returns (tokens [B] long,
    logprobs [B] fp32)."""
    logits = logits.float()
    temps = [p.temperature or 1.0 for p in params]  # greedy (0) rows: their logprobs at T=1
    if all(t == 1.0 for t in temps):  # greedy rows and T=1 sampling: no scaled copy of the logits
        scaled = logits
    else:
        scaled = logits / torch.tensor(temps, dtype=torch.float32, device=logits.device)[:, None]
    tokens = logits.argmax(dim=-1)  # the greedy rows' tokens; sampled rows are overwritten below
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        tokens[rows] = _sample_rows(scaled[rows], [params[i] for i in rows],
                                    [generators[i] for i in rows], shared)
    # log_softmax(scaled)[token] without materialising the whole [B, V] log_softmax
    return tokens, scaled.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(scaled, dim=-1)


def _sample_rows(scaled: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None],
                 shared: torch.Generator) -> torch.Tensor:
    scaled = _truncate(scaled, params)
    probs = torch.softmax(scaled, dim=-1)
    noise = torch.empty_like(probs)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        # Exponential noise is drawn on CPU from CPU generators so a seed means the same stream on
        # any device.
        noise[unseeded] = (torch.empty(len(unseeded), probs.shape[1])
                           .exponential_(generator=shared).to(probs.device))
    for i, g in enumerate(generators):
        if g is not None:
            noise[i] = torch.empty(probs.shape[1]).exponential_(generator=g).to(probs.device)
    return (probs / noise).argmax(dim=-1)


def _truncate(scaled: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p set (the kept set always has >= 1 token)."""
    vocab = scaled.shape[1]
    top_k = torch.tensor([min(p.top_k, vocab) for p in params], device=scaled.device)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=scaled.device)
    if bool((top_k >= vocab).all()) and bool((top_p >= 1.0).all()):
        return scaled
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=scaled.device)[None, :]
    drop = rank >= top_k[:, None]
    sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # probability mass strictly above this token
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop |= mass_before > top_p[:, None]
    drop[:, 0] = False
    mask = torch.zeros_like(drop).scatter(1, order, drop)
    return scaled.masked_fill(mask, float("-inf"))
