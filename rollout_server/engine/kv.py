"""Preallocated per-slot KV cache that a Hugging Face decoder writes into through ``update()``
(transformers 5.x decoders only call ``past_key_values.update(k, v, layer_idx)``; ENGINE.md,
Scheduling). Layout per layer: ``K, V = [slots, kv_heads, capacity, head_dim]``.

Invariants: a slot holds exactly one request's KV for positions ``[0, cached)``; positions past
that are garbage and always masked. ``capacity`` only grows (doubling, copy) until ``flush``.
Nothing outlives its request (``move`` copies KV between slots only for compaction and for
identical prompts prefilled in the same pass).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rollout_server.engine.host import to_device

INITIAL_CAPACITY = 128  # tokens per slot before the first growth; doubling keeps reallocations rare


class SlotKV:
    def __init__(self, num_layers: int, slots: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.shape = (slots, kv_heads, head_dim)
        self.num_layers, self.max_len, self.dtype, self.device = (num_layers, max_len, dtype,
                                                                  torch.device(device))
        self._rows = slice(0, 0)
        self._write_pos: torch.Tensor | None = None  # decode: per-row position of the new token
        self._kv_len = 0
        self.flush()

    # ---- scheduler side
    def ensure(self, length: int) -> None:
        """Grow every slot to hold at least ``length`` positions (keeps the cached prefix)."""
        if length <= self.capacity:
            return
        new_cap = min(self.max_len, max(length, 2 * self.capacity))
        slots, heads, dim = self.shape
        empty = torch.zeros(slots, heads, 0, dim, dtype=self.dtype, device=self.device)
        for store in (self.K, self.V):
            store.extend([empty] * (self.num_layers - len(store)))  # the first call
            for layer, t in enumerate(store):  # one layer at a time: peak memory grows by one layer
                store[layer] = F.pad(t, (0, 0, 0, new_cap - self.capacity))  # zeros after
        self.capacity = new_cap

    def flush(self) -> None:
        """Drop all memory back to the initial size (only when no request holds a slot)."""
        self.K, self.V, self.capacity = [], [], 0
        self.ensure(min(INITIAL_CAPACITY, self.max_len))

    def set_rows(self, rows: slice, kv_len: int, write_pos: torch.Tensor | None = None) -> None:
        """The slots the next forward writes: a prefill from 0, or (``write_pos``) a decode."""
        self._rows, self._write_pos, self._kv_len = rows, write_pos, kv_len

    def move(self, srcs: list[int], dsts: list[int], length: int) -> None:
        """Copy the first ``length`` positions of slot ``srcs[i]`` into slot ``dsts[i]`` for every
        i, in one indexed copy per tensor. No slot may be both a source and a destination."""
        if not srcs:
            return
        src, dst = to_device([srcs, dsts], torch.long, self.device)  # no wait on queued work
        for store in (self.K, self.V):
            for t in store:
                t[dst, :, :length] = t[src, :, :length]

    # ---- model side (transformers' Cache protocol, the part decoders use)
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs):
        K, V = self.K[layer_idx], self.V[layer_idx]
        rows = self._rows
        if self._write_pos is not None:  # decode: one new token per row, each at its own position
            r = torch.arange(rows.start, rows.stop, device=K.device)
            K[r, :, self._write_pos] = key_states[:, :, 0]
            V[r, :, self._write_pos] = value_states[:, :, 0]
        else:  # right-padded prefill into fresh slots
            n = key_states.shape[2]
            K[rows, :, :n] = key_states
            V[rows, :, :n] = value_states
        return K[rows, :, :self._kv_len], V[rows, :, :self._kv_len]

    def get_seq_length(self, *args, **kwargs) -> int:
        return 0  # positions are always passed explicitly

    @property
    def is_compileable(self) -> bool:
        return False
