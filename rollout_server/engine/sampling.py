"""Per-request sampling parameters and the batched sampler with its logprob convention
(ENGINE.md, "Sampling and logprobs").

Logprob convention (the contract with the trainer, areal_like/DESIGN.md section 2):
``logprob[t] = log_softmax(logits_t / temperature)[token_t]`` in fp32, before top-p / top-k
truncation, as SGLang returns by default. ``temperature == 0`` is greedy (temperature 1, top_k 1).

Sampling is inverse-CDF on the device: row i draws the token whose interval of the (truncated)
distribution's cumulative sum, taken in fp64, holds ``u_i * total``, an exact sample from ``p``
for ``u_i ~ U[0, 1)``. The only random input is that one number per row, drawn on the host from
the request's own ``random.Random`` (``sampling_seed``) before the forward pass and copied with
the rest of the step's parameters in one transfer (``prepare``): no vocabulary-sized noise, no
per-row kernel, and nothing read back but the step's tokens and logprobs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from rollout_server.engine.host import to_device

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


def seeded_rng(seed: int) -> random.Random:
    """A request's own stream of uniforms. ``random.Random`` seeds an int by its absolute value;
    taking the seed modulo 2**64 keeps every int64 ``sampling_seed`` distinct."""
    return random.Random(seed % (1 << 64))


@dataclass(frozen=True, slots=True)
class Batch:
    """One step's sampling inputs: per-row tensors on the device, what selects the path on the
    host (so choosing it never reads the device)."""

    temperature: torch.Tensor  # [B] fp32; greedy rows 1 (their logprobs at T=1 unless T>0)
    top_k: torch.Tensor  # [B] long
    top_p: torch.Tensor  # [B] fp32
    uniform: torch.Tensor  # [B] fp64 in [0, 1); 0 for greedy rows
    greedy: torch.Tensor  # [B] bool
    any_greedy: bool
    all_greedy: bool
    scale: bool  # some row's temperature is not 1
    max_top_k: int  # the largest top_k among sampled rows (TOP_K_ALL: some row keeps everything)
    top_p_used: bool  # some sampled row has top_p < 1


def prepare(params: list[SamplingParams], uniforms: list[float],
            device: torch.device) -> Batch:
    """The step's sampling inputs in one host-to-device copy that does not wait for the device
    (``host.to_device``), so it can be made before the forward pass is queued."""
    temps = [p.temperature or 1.0 for p in params]
    greedy = [p.greedy for p in params]
    sampled = [p for p, g in zip(params, greedy) if not g]
    host = to_device([temps, [p.top_k for p in params], [p.top_p for p in params],
                      [0.0 if g else u for g, u in zip(greedy, uniforms)],
                      [float(g) for g in greedy]], torch.float64, device)
    return Batch(temperature=host[0].float(), top_k=host[1].long(), top_p=host[2].float(),
                 uniform=host[3], greedy=host[4].bool(), any_greedy=any(greedy),
                 all_greedy=all(greedy), scale=any(t != 1.0 for t in temps),
                 max_top_k=max((p.top_k for p in sampled), default=1),
                 top_p_used=any(p.top_p < 1.0 for p in sampled))


def sample(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row on the logits' device, never reading it. ``logits``: [B, V] (any
    dtype). Returns (tokens [B] long, logprobs [B] fp32)."""
    logits = logits.float()
    scaled = logits / batch.temperature[:, None] if batch.scale else logits
    greedy_tokens = logits.argmax(dim=-1) if batch.any_greedy else None
    if batch.all_greedy:
        tokens = greedy_tokens
    else:
        tokens = _draw(scaled, batch)
        if greedy_tokens is not None:  # where, not indexing: a boolean index reads the device
            tokens = torch.where(batch.greedy, greedy_tokens, tokens)
    # log_softmax(scaled)[token] without materialising the whole [B, V] log_softmax
    return tokens, scaled.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(scaled, dim=-1)


def _draw(scaled: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Inverse-CDF draw from ``softmax(scaled)`` truncated to each row's top-k, then top-p of that
    (SGLang's order: top-p over the top-k set renormalized). A truncation is a cut on the logit:
    every token tied with the last one kept is kept too, so the kept set, and the token a uniform
    picks (always in vocabulary order), depend only on the row, never on the batch or on how a
    sort orders equal values."""
    vocab = scaled.shape[1]
    k = min(batch.max_top_k, vocab)
    top = scaled.amax(dim=-1, keepdim=True)
    weights = torch.exp(scaled - top)
    if k < vocab or batch.top_p_used:
        values = (scaled.sort(dim=-1, descending=True) if k == vocab else scaled.topk(k)).values
        cut = values.gather(1, (batch.top_k.clamp(max=k) - 1)[:, None])  # [B, 1]
        if batch.top_p_used:
            kept = torch.exp(values - top).masked_fill(values < cut, 0.0)
            cum = kept.cumsum(dim=-1, dtype=torch.float64)
            # tokens whose probability mass strictly before them (in the top-k set) is within top_p
            within = ((cum - kept) / cum[:, -1:] <= batch.top_p[:, None]).sum(dim=-1)
            cut = torch.maximum(cut, values.gather(1, (within.clamp(min=1) - 1)[:, None]))
        weights = weights.masked_fill(scaled < cut, 0.0)
    cdf = weights.cumsum(dim=-1, dtype=torch.float64)
    total = cdf[:, -1]
    # target < total strictly, so the interval found is a kept token's (positive weight)
    target = torch.minimum(batch.uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target[:, None], right=True)[:, 0]
