"""Buckets of the weight broadcast: the plan (pure) and the wire format (trainer rank 0).

Owns: ``plan_buckets`` (which tensors travel together, in which order), the flattened-bucket wire
format and ``BucketPipeline``, which puts buckets on the weight group one after the other.

Wire format (SGLang's ``load_format: "flattened_bucket"``, ``sglang/srt/weight_sync/tensor_bucket.py``):
a bucket is ONE ``dist.broadcast`` of a uint8 buffer holding the bucket's tensors back to back in
``names`` order, each as its row-major bytes in its wire dtype, with no padding (one dtype per
bucket keeps every tensor aligned). The rollout servers announce it with every bucket
(``rollout_server.weight_update.FLATTENED``); SGLang 0.5.23 and the embedded engine receive it.
One broadcast per bucket instead of one per tensor: a model has hundreds of small tensors (norms,
biases) whose per-op latency dominates their bytes.

Invariants:
- ``plan_buckets`` is deterministic: every trainer rank computes the same buckets and order.
- One bucket is on the wire at a time: bucket i+1 is gathered and packed into the other staging
  buffer while bucket i is broadcast, and a staging buffer is refilled only after the broadcast
  that read it completed. The staging buffers live as long as the pipeline (reused by every
  push): 2x the largest bucket of extra memory on the trainer's device. Their bytes stay as packed
  until the next ``stage``, so a push can send them twice (``staged_buckets``, ``restage``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from areal_like.protocol import BucketSpec

FLATTENED = "flattened_bucket"  # SGLang's load_format name; rollout_server.weight_update sends it
_ITEMSIZE = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4, "int16": 2,
             "int8": 1, "uint8": 1, "bool": 1}


def plan_buckets(named_shapes_dtypes: list[tuple[str, list[int], str]], bucket_bytes: int) -> list[BucketSpec]:
    """Group tensors into broadcast buckets of at most ``bucket_bytes`` each.

    Each bucket holds one dtype. Dtypes appear in order of first occurrence and tensors keep their
    relative order within a dtype, so the order of names is deterministic and equal on every
    rank. A tensor larger than ``bucket_bytes`` gets a bucket of its own. Pure; no torch.
    """
    by_dtype: dict[str, list[tuple[str, list[int]]]] = {}
    for name, shape, dt in named_shapes_dtypes:
        if dt not in _ITEMSIZE:
            raise ValueError(f"{name}: unsupported dtype {dt!r}")
        by_dtype.setdefault(dt, []).append((name, [int(s) for s in shape]))
    buckets: list[BucketSpec] = []
    for dt, items in by_dtype.items():
        cur: list[tuple[str, list[int]]] = []
        cur_bytes = 0
        for name, shape in items:
            nbytes = _ITEMSIZE[dt] * math.prod(shape)
            if cur and cur_bytes + nbytes > bucket_bytes:
                buckets.append(_spec(cur, dt))
                cur, cur_bytes = [], 0
            cur.append((name, shape))
            cur_bytes += nbytes
        if cur:
            buckets.append(_spec(cur, dt))
    return buckets


def _spec(items: list[tuple[str, list[int]]], dt: str) -> BucketSpec:
    return BucketSpec(names=[n for n, _ in items], dtypes=[dt] * len(items), shapes=[s for _, s in items])


def pack_bucket(tensors: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Copy ``tensors`` back to back into the uint8 buffer ``out`` (the flattened-bucket layout);
    returns the filled prefix. Tensors must already be in their wire dtype."""
    parts = [t.reshape(-1).view(torch.uint8) for t in tensors]
    flat = out[:sum(p.numel() for p in parts)]
    torch.cat(parts, out=flat)
    return flat


class BucketPipeline:
    """Rank 0: packs bucket after bucket into two staging buffers and broadcasts each with one op.

    One broadcast is in flight at a time; the next bucket is packed into the other staging buffer
    meanwhile (measured: launching bucket i+1 before bucket i completed, two concurrent broadcasts
    on one gloo group, was a few percent slower end to end). ``wait(work)`` is how the caller waits
    (bounded). ``stage`` packs a bucket without sending it, so the first ``SLOTS`` buckets can be
    packed before the engines are asked to pause; ``launch`` sends the oldest staged bucket once
    the previous broadcast completed; ``send`` is both; ``finish`` waits for everything."""

    SLOTS = 2

    def __init__(self, wait: Callable[[dist.Work], None] = lambda w: w.wait()):
        self.wait = wait
        self._staging: list[torch.Tensor | None] = [None] * self.SLOTS
        self._works: list[dist.Work | None] = [None] * self.SLOTS  # per staging buffer: the broadcast reading it
        self._next = 0  # the staging buffer the next bucket is packed into
        self._staged: list[tuple[int, torch.Tensor]] = []  # packed, not yet launched, oldest first

    def stage(self, tensors: list[torch.Tensor]) -> int:
        """Pack ``tensors`` (one bucket, wire dtype, plan order) into the next staging buffer, once the
        broadcast that read it before completed. Returns the bucket's bytes."""
        slot = self._next
        if any(s == slot for s, _ in self._staged):
            raise RuntimeError("both staging buffers hold buckets not launched yet")
        self._wait_slot(slot)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        buf = self._staging[slot]
        if buf is None or buf.numel() < nbytes or buf.device != tensors[0].device:
            buf = self._staging[slot] = torch.empty(nbytes, dtype=torch.uint8, device=tensors[0].device)
        self._staged.append((slot, pack_bucket(tensors, buf)))
        self._next = (slot + 1) % self.SLOTS
        return nbytes

    def launch(self, pg) -> None:
        """Start broadcasting the oldest staged bucket, after the previous broadcast completed."""
        self.finish()
        slot, flat = self._staged.pop(0)
        self._works[slot] = dist.broadcast(flat, group_src=0, group=pg, async_op=True)

    def send(self, tensors: list[torch.Tensor], pg) -> int:
        nbytes = self.stage(tensors)
        self.launch(pg)
        return nbytes

    @property
    def staged(self) -> int:
        """How many packed buckets wait for ``launch``."""
        return len(self._staged)

    def finish(self) -> None:
        """Wait for every bucket sent, oldest first."""
        for i in range(self.SLOTS):
            self._wait_slot((self._next + i) % self.SLOTS)

    def _wait_slot(self, slot: int) -> None:
        work, self._works[slot] = self._works[slot], None
        if work is not None:
            self.wait(work)

    def staged_buckets(self) -> list[tuple[int, torch.Tensor]]:
        """The packed buckets not launched yet, oldest first (``restage`` puts them back)."""
        return list(self._staged)

    def restage(self, staged: list[tuple[int, torch.Tensor]]) -> None:
        """Stage again what ``staged_buckets`` returned, to send the same bytes once more (a re-push of
        a model that fits in the staging buffers: nothing packs into them between the two sends)."""
        self.abandon()
        self._staged = list(staged)

    def abandon(self) -> None:
        """After a failure or a push without members: forget the staged and the in-flight buckets."""
        self._staged, self._works = [], [None] * self.SLOTS

    def release(self) -> None:
        """Free the staging buffers (the next push allocates them again)."""
        self.abandon()
        self._staging = [None] * self.SLOTS
