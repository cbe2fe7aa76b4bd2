"""Staleness policy (pure: no I/O, no clock); the formulas, their argument and a worked example:
STALENESS.md. Invariants: a credit is granted only within ``admission_limit``; a batch holds only
groups with ``v - h <= eta`` (``check_batch`` raises ``StaleBatchError`` otherwise). The values are
the config's, checked there (``BufferConfig``, ``RunConfig``: ``engine_lag <= max_staleness``)."""

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
    # lambda: versions the engines may lag behind the trainer by design (<= eta)
    engine_lag: int = 0

    def admission_limit(self, consumed: int, lag: int = 0) -> int:
        """How many groups may have been started, for an engine ``lag`` versions behind."""
        lag = max(self.engine_lag, lag)
        return consumed + (self.max_staleness - lag + 1) * self.groups_per_step

    def capacity(self, consumed: int, started: int, in_flight: int, lag: int = 0) -> int:
        """How many new credits may be granted now (>= 0)."""
        room = self.admission_limit(consumed, lag) - started
        return max(0, min(self.max_inflight - in_flight, room))

    def engine_lag_of(self, engine_version: int, trainer_version: int) -> int:
        """How many versions an engine is behind the trainer (0 when ahead or unknown, ``-1``)."""
        return 0 if engine_version < 0 else max(0, trainer_version - engine_version)

    def is_fresh(self, head_version: int, trainer_version: int) -> bool:
        return trainer_version - head_version <= self.max_staleness

    def min_fresh_version(self, trainer_version: int) -> int:
        return trainer_version - self.max_staleness

    def engine_can_start(self, engine_version: int, trainer_version: int) -> bool:
        """An engine older than the bound would only produce stale data; one that has not
        reported its version (``-1``) is trusted (consumption checks again)."""
        return engine_version < 0 or self.is_fresh(engine_version, trainer_version)

    def check_batch(self, head_versions: Iterable[int], trainer_version: int) -> None:
        for h in head_versions:
            if not self.is_fresh(h, trainer_version):
                raise StaleBatchError(f"group with head version {h} at trainer version "
                                      f"{trainer_version} exceeds "
                                      f"max_staleness={self.max_staleness}")
