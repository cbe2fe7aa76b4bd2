"""Staleness policy: how far generation may run ahead of training (pure, no I/O, no clock).

Definitions (areal_like/DESIGN.md section 2). ``v`` is the trainer's policy_version (the batch it takes
next trains the step v -> v+1), ``eta`` = ``max_staleness``, ``B`` = ``groups_per_step``. A
group's head version ``h`` is the minimum version over its tokens; its staleness when consumed
at ``v`` is ``v - h``.

Two rules, two roles:

* **Admission (the saver).** A new credit (a prompt to generate a group for) is granted only while

      started < (eta + v + 1) * B      and      in_flight < max_inflight

  ``started`` counts every group ever admitted that still holds its slot: in flight, stored or
  consumed. A group dropped by a filter or for staleness, or a lease that expired, gives its slot
  back (``started -= 1``), so filtering can never starve the trainer. Since the trainer consumes
  B groups per version, ``consumed = v * B`` and the rule keeps ``in_flight + stored <= (eta+1)*B``:
  a group started now, at head version >= v, is at most eta versions old when it is consumed.
* **Consumption (the guarantee).** ``is_fresh(h, v)`` is ``v - h <= eta``. A group that fails it is
  never handed to the trainer (dropped or its prompt re-issued, always counted); ``check_batch``
  raises ``StaleBatchError`` if a batch would contain one, so a bug elsewhere cannot train on
  stale data silently.

Worked example, eta = 1, B = 4, max_inflight = 16:

    v = 0: (1 + 0 + 1) * 4 = 8   -> credits for groups 1..8, the 9th request waits
    trainer takes groups 1..4 at v = 0, publishes v = 1
    v = 1: (1 + 1 + 1) * 4 = 12  -> 4 more credits (started 8 -> 12)
    a group generated entirely at version 0 and consumed at v = 1: staleness 1 <= eta, fresh;
    still stored when v = 2: staleness 2 > eta, dropped (started 12 -> 11, one credit frees up).

eta = 0 gives synchronous RL: (0 + v + 1) * B admits exactly B groups per version, all generated
by version v, and consumption accepts only head version == v.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


class StaleBatchError(AssertionError):
    """A batch about to be handed to the trainer contains a group older than the bound."""


@dataclass(frozen=True, slots=True)
class StalenessPolicy:
    max_staleness: int  # eta
    groups_per_step: int  # B
    max_inflight: int  # cap on groups being generated at once

    def __post_init__(self) -> None:
        if self.max_staleness < 0 or self.groups_per_step < 1 or self.max_inflight < 1:
            raise ValueError(f"invalid staleness policy {self}")

    def admission_limit(self, version: int) -> int:
        """``(eta + v + 1) * B``: how many groups may have been started by trainer version v."""
        return (self.max_staleness + version + 1) * self.groups_per_step

    def capacity(self, version: int, started: int, in_flight: int) -> int:
        """How many new credits may be granted now (>= 0)."""
        return max(0, min(self.max_inflight - in_flight, self.admission_limit(version) - started))

    def admits(self, version: int, started: int, in_flight: int) -> bool:
        return self.capacity(version, started, in_flight) > 0

    def staleness(self, head_version: int, trainer_version: int) -> int:
        return trainer_version - head_version

    def is_fresh(self, head_version: int, trainer_version: int) -> bool:
        return trainer_version - head_version <= self.max_staleness

    def min_fresh_version(self, trainer_version: int) -> int:
        """The oldest head version still usable at ``trainer_version``."""
        return trainer_version - self.max_staleness

    def engine_can_start(self, engine_version: int, trainer_version: int) -> bool:
        """A server whose engine serves weights older than the bound would only produce stale data.

        ``-1`` means the engine has not reported its version; it is trusted (it will be checked again
        at consumption)."""
        return engine_version < 0 or self.is_fresh(engine_version, trainer_version)

    def check_batch(self, head_versions: Iterable[int], trainer_version: int) -> None:
        """The consume-time guarantee: raise if any group in a batch is stale."""
        for h in head_versions:
            if not self.is_fresh(h, trainer_version):
                raise StaleBatchError(f"group with head version {h} at trainer version {trainer_version} "
                                      f"exceeds max_staleness={self.max_staleness}")
