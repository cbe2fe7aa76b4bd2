"""Who computes which sequences: ranks balanced by tokens, then micro-batches, padded or packed.

Pure planning, identical on every rank (each holds the whole batch). A sequence's length is its
prompt plus its output. Padded micro-batches compute ``n * longest`` positions, packed ones (one
row, positions restarting per sequence) ``sum(len)``.

``plan_minibatch``: ranks by greedy longest-first (LPT); each rank's sequences, longest first,
into micro-batches by first-fit decreasing under ``max_tokens`` (a longer sequence runs alone;
packed, then evened out longest-first), else in runs of ``max_seqs``; every rank runs as many
calls as the busiest (the others end in ``None``: zero-weight passes keep FSDP's collectives
aligned). Any plan gives the same loss.
``trainer/step.py``'s ``plan`` packs a minibatch unless every call of its padded plan wastes less
than ``trainer.pack_min_padding`` of its positions: on CPU a packed forward costs more per
position (a segmented attention per length; CUDA runs one varlen kernel), so short, even sequences
train faster padded (measured in
benchmarks/README.md, "The user's path"), and no padded call computes more than 1 / (1 - that
share) positions per real token (activation memory).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Plan:
    """One minibatch's calls: ``calls[r]`` are rank r's micro-batches (row indices, or None)."""

    calls: list[list[torch.Tensor | None]]
    lens: dict[int, int]  # row -> sequence length (prompt + output)
    packed: bool

    def computed(self, rows: torch.Tensor) -> int:
        """Token positions one forward over ``rows`` computes (padding included)."""
        lens = [self.lens[int(r)] for r in rows]
        return sum(lens) if self.packed else len(lens) * max(lens)

    def worst_padding(self) -> float:
        """The largest share of padding among the calls (0 when packed)."""
        calls = [c for cs in self.calls for c in cs if c is not None and len(c)]
        return max((1.0 - sum(self.lens[int(r)] for r in c) / self.computed(c) for c in calls),
                   default=0.0)

    def stats(self) -> dict[str, float]:
        """Sums over the minibatch (``_max``: maxima), as ``trainer/step.py`` combines its stats:
        ``seq_tokens`` (real), ``computed_tokens`` (with padding), ``micro_batches`` (non-empty
        calls, all ranks), ``rank_tokens_max`` / ``rank_tokens_min`` (real tokens per rank)."""
        per_rank = [sum(self.lens[int(r)] for c in cs if c is not None for r in c)
                    for cs in self.calls]
        mbs = [c for cs in self.calls for c in cs if c is not None]
        return {"seq_tokens": float(sum(per_rank)),
                "computed_tokens": float(sum(self.computed(c) for c in mbs)),
                "micro_batches": float(len(mbs)),
                "rank_tokens_max": float(max(per_rank)), "rank_tokens_min": float(min(per_rank))}


def balance_ranks(rows: Sequence[int] | torch.Tensor, lens: Sequence[int] | torch.Tensor,
                  world: int) -> list[list[int]]:
    """Greedy longest-first partition of ``rows`` (``lens[i]``: the length of ``rows[i]``) over
    ``world`` ranks by tokens; each rank's rows come longest first."""
    order = sorted(range(len(rows)), key=lambda i: (-int(lens[i]), int(rows[i])))
    load, parts = [0] * world, [[] for _ in range(world)]
    for i in order:
        r = min(range(world), key=lambda k: (load[k], k))
        load[r] += int(lens[i])
        parts[r].append(int(rows[i]))
    return parts


def split_microbatches(rows: list[int], lens: dict[int, int], *, max_seqs: int, max_tokens: int,
                       packed: bool) -> list[list[int]]:
    """One rank's micro-batches of ``rows`` (longest first): by token budget when ``max_tokens``
    > 0 (first-fit decreasing, counting padding when not ``packed``), else ``max_seqs`` a call.
    Packed, the calls are then evened out longest-first over as many calls, or one more where
    that is what keeps every call within the budget (else first fit stays), so the largest call,
    the activation peak, is no fuller than it must be."""
    if max_tokens <= 0:
        return [rows[i:i + max_seqs] for i in range(0, len(rows), max_seqs)]
    bins: list[list[int]] = []
    for r in rows:
        for b in bins:
            n = len(b) + 1
            cost = sum(lens[x] for x in b) + lens[r] if packed else n * max(lens[b[0]], lens[r])
            if cost <= max_tokens:
                b.append(r)
                break
        else:
            bins.append([r])
    if packed:
        row_lens = [lens[r] for r in rows]
        for calls in range(len(bins), min(len(bins) + 1, len(rows)) + 1):
            even = balance_ranks(rows, row_lens, calls)
            if all(len(b) == 1 or sum(lens[r] for r in b) <= max_tokens for b in even):
                return even
    return bins


def plan_minibatch(rows: torch.Tensor, seq_lens: torch.Tensor, world: int, *, max_seqs: int,
                   max_tokens: int, packed: bool) -> Plan:
    """The calls of every rank for the minibatch ``rows`` (``seq_lens``: per row of the batch)."""
    lens = {int(r): int(seq_lens[r]) for r in rows}
    parts = balance_ranks(rows, seq_lens[rows], world)
    per_rank = [split_microbatches(p, lens, max_seqs=max_seqs, max_tokens=max_tokens, packed=packed)
                for p in parts]
    n_calls = max(1, max(len(c) for c in per_rank))
    calls = [[torch.tensor(c, dtype=torch.long) for c in cs] + [None] * (n_calls - len(cs))
             for cs in per_rank]
    return Plan(calls, lens, packed)
