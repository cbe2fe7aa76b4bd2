"""What every sender of weight sync shares: the ``Sender`` interface, what a push sends
(``PushTensors``, ``gather``), and the staging pipeline of the group path's broadcast (wire
format: ``areal_like.wire.weight_wire``).

Invariants:
- ``gather`` is a collective: every rank gathers the same buckets in the same order.
- One bucket is on the wire at a time, the next staged meanwhile into the other buffer; a buffer
  is refilled only after the broadcast that read it completed. The two buffers (2x the largest
  bucket) live as long as the pipeline, and keep their bytes until the next ``stage``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.distributed as dist

from areal_like.weights.hf import checkpoint_layout
from areal_like.weights.lora import is_adapter, synced_parameters
from areal_like.weights.plan import BucketSpec
from areal_like.wire.weight_wire import pack
from trainer.ranks import full


class PushTensors:
    """What a push of ``model`` sends (``synced_parameters``: with LoRA its adapters alone), named
    as a checkpoint of it is: transformers' conversion reversed (``checkpoint_layout``, the
    export's), so a mixture's fused experts travel one tensor per expert, the names and shapes
    SGLang's ``load_weights`` takes; adapters as they are. ``entries``: (name, shape, parameter)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.params = synced_parameters(model)
        self._by_name = dict(self.params)
        adapters = bool(self.params) and is_adapter(self.params[0][0])
        self.entries: list[tuple[str, list[int], str]] = []
        self._converted: set[str] = set()  # the parameters sent under other names or shapes
        for name, p in self.params:
            meta = torch.empty(p.shape, device="meta")
            layout = [(name, meta)] if adapters else list(checkpoint_layout(model, name, meta))
            if [(n, t.shape) for n, t in layout] != [(name, p.shape)]:
                self._converted.add(name)
            self.entries += [(saved, list(t.shape), name) for saved, t in layout]
        self._source = {saved: name for saved, _, name in self.entries}

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The full tensors of ``names`` (an all-gather over the ranks of a shard per parameter);
        a parameter split over several names is gathered once for all of those asked."""
        out: dict[str, torch.Tensor] = {}
        for name in dict.fromkeys(self._source[n] for n in names):
            t = full(self._by_name[name]).detach()
            out.update(checkpoint_layout(self.model, name, t) if name in self._converted
                       else [(name, t)])
        return out


def gather(push: PushTensors, bucket: BucketSpec, dtype: str) -> list[torch.Tensor]:
    """The full tensors of ``bucket`` in ``dtype`` (a collective: every rank of a shard)."""
    got = push.tensors(bucket.names)
    wire = getattr(torch, dtype)
    return [got[n].to(wire) for n in bucket.names]


class Sender(ABC):
    """How one ``weight_sync.path`` gets a push's buckets to the engines. Per push ``stage`` (all
    ranks); per attempt ``route`` and ``connect`` (rank 0), then ``send`` or ``skip``; ``rewind``
    before a re-push, ``done`` after the push. The defaults: a plan that carries everything."""

    def overlaps(self, buckets: list[BucketSpec]) -> bool:
        """Whether rank 0 may finish the push in the background (``stage`` kept copies of all)."""
        return False

    def holds_all(self, buckets: list[BucketSpec]) -> bool:
        """Whether ``stage`` staged every bucket: rank 0 then sends (and re-sends) alone."""
        return True

    @abstractmethod
    def stage(self, model: torch.nn.Module, params, buckets: list[BucketSpec], report) -> None: ...

    @abstractmethod
    def route(self, version: int, roster: list[tuple[str, int, str]]) -> dict: ...

    def connect(self, plan, roster: list[tuple[str, int, str]], watch,
                engine_key: str) -> None:
        """Nothing to join: the plan carries the weights (``engine_key``: what a group's store
        gate asks its members to prove)."""

    def send(self, params, buckets: list[BucketSpec], report, deadline: float,
             check: Callable[[], None]) -> None:
        """Nothing travels after the plan."""

    def skip(self) -> None:
        """Nothing to drop."""

    def rewind(self, params, buckets: list[BucketSpec], report) -> None:
        """A re-push sends what is still held."""

    def forget_members(self) -> None:
        """No group to re-form."""

    def done(self) -> None:
        """Nothing is held past a push."""

    def close(self) -> None:
        self.done()


class BucketPipeline:
    """Rank 0: packs bucket after bucket into two staging buffers, one broadcast in flight at a time
    (two concurrent ones were slower). ``stage`` packs without sending, ``launch`` sends the oldest
    staged bucket, ``send`` is both, ``finish`` waits for everything; ``wait(work)`` is bounded."""

    SLOTS = 2

    def __init__(self, wait: Callable[[dist.Work], None] = lambda w: w.wait()):
        self.wait = wait
        self._staging: list[torch.Tensor | None] = [None] * self.SLOTS
        # per staging buffer: the broadcast reading it
        self._works: list[dist.Work | None] = [None] * self.SLOTS
        self._next = 0  # the staging buffer the next bucket is packed into
        self._staged: list[tuple[int, torch.Tensor]] = []  # packed, not yet launched, oldest first

    def stage(self, tensors: list[torch.Tensor]) -> int:
        """Pack one bucket into the next staging buffer once its last broadcast completed;
        its bytes."""
        slot = self._next
        if any(s == slot for s, _ in self._staged):
            raise RuntimeError("both staging buffers hold buckets not launched yet")
        self._wait_slot(slot)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        buf = self._staging[slot]
        if buf is None or buf.numel() < nbytes or buf.device != tensors[0].device:
            buf = self._staging[slot] = torch.empty(nbytes, dtype=torch.uint8,
                                                    device=tensors[0].device)
        self._staged.append((slot, pack(tensors, buf)))
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
        """Stage again what ``staged_buckets`` returned, to send the same bytes once more."""
        self.abandon()
        self._staged = list(staged)

    def abandon(self) -> None:
        """After a failure or a push without members:
        forget the staged and the in-flight buckets."""
        self._staged, self._works = [], [None] * self.SLOTS

    def release(self) -> None:
        """Free the staging buffers (the next push allocates them again)."""
        self.abandon()
        self._staging = [None] * self.SLOTS
