"""Which weights the engines serve after each optimizer step: ``EngineSchedule``.

Modes (``trainer.weight_sync``; ``buffer/STALENESS.md`` "Engine lag"): every version (default);
lagged (``every = L``: push when v is a multiple of L, or at ``trainer.steps``); forced delay
(``delay = D``: push version max(v0, v - D) from snapshots, v0 the version this process started
from).

Invariants:
- The buffer always hears the trainer's version (``push(..., announce=v)`` or ``announce(v)``).
- A push's label is the version of the weights pushed. A snapshot is this rank's local shards,
  copied into the model only for the duration of a push.
- ``repush`` sends what the engines should serve now, never newer. Snapshots held: one (lagged),
  D + 1 (delay), none (default).
- ``STALL_PUSHES`` re-pushes in a row that each ran into ``weight_sync.deadline_s`` with no engine
  done log one error naming the setting (once per such streak; it had re-pushed every few seconds
  saying only that it re-pushes). The re-pushes go on: an outage of the engines' network looks
  the same and ends, and a long-lived trainer must outlive it.
"""

from __future__ import annotations

import logging
from collections import deque
from contextlib import contextmanager

import torch

from areal_like.settings.config import WeightSyncConfig
from trainer.weight_sync import SyncReport, WeightBroadcaster

log = logging.getLogger("trainer")
# re-pushes in a row, each cut at its deadline with no engine done, before the error says why
STALL_PUSHES = 3


class EngineSchedule:
    """Pushes (or only announces) after each step, by ``trainer.weight_sync.every`` / ``delay``."""

    def __init__(self, cfg: WeightSyncConfig, broadcaster: WeightBroadcaster,
                 model: torch.nn.Module,
                 final_version: int):
        self.every, self.delay = cfg.every, cfg.delay
        self.wb, self.model, self.final_version = broadcaster, model, final_version
        self.snapshots: deque[tuple[int, list[torch.Tensor]]] = deque()
        self.served: int | None = None  # the label the engines were last pushed
        self.cut: list[float] = []  # rank 0: seconds of the re-pushes in a row cut, none done

    @property
    def lagging(self) -> bool:
        return self.every > 1 or self.delay > 0

    def target(self, version: int) -> int:
        """The version the engines should serve while the trainer is at ``version``."""
        if self.delay:
            return max(self.snapshots[0][0], version - self.delay)
        if (self.every > 1 and version % self.every and version < self.final_version
                and self.served is not None):
            return self.served
        return version

    def after_step(self, version: int, wait: bool = True) -> SyncReport:
        """Every rank, once the trainer is at ``version`` (the initial one too)."""
        if self.lagging and (self.delay or not self.snapshots or version % self.every == 0
                             or version >= self.final_version):
            self._snapshot(version)
        target = self.target(version)
        if target == self.served:
            return self.wb.announce(version)
        return self._push(target, version, wait)

    def repush(self, version: int) -> SyncReport:
        """Push again what the engines should be serving (a stall: one may have missed a push);
        after the ``STALL_PUSHES``-th in a row cut at its deadline with no engine done, rank 0
        logs why once (module docstring)."""
        report = self._push(self.target(version) if self.served is not None else version, version)
        failed = report.cut and report.members and not report.done
        self.cut = [*self.cut, report.seconds] if failed else []
        if len(self.cut) == STALL_PUSHES and self.wb.rank == 0:
            log.error("%s", self.unmeetable(report))
        return report

    def unmeetable(self, report: SyncReport) -> str:
        took = ", ".join(f"{s:.2f}" for s in self.cut)
        return (f"weight sync: {len(self.cut)} pushes of version {report.version} in a row ran "
                f"into trainer.weight_sync.deadline_s={self.wb.cfg.deadline_s:g} ({took} s) and "
                f"no engine loaded it ({', '.join(report.dropped)} dropped), so the data the "
                "trainer waits for cannot come: raise trainer.weight_sync.deadline_s above what "
                "a push takes here (or the engines are unreachable); re-pushing on")

    def _push(self, target: int, version: int, wait: bool = True) -> SyncReport:
        if target == version:
            report = self.wb.push(self.model, version, wait=wait)
        else:
            with self._swapped(target):
                report = self.wb.push(self.model, target, announce=version)
        self.served = target
        return report

    def _params(self) -> list[torch.Tensor]:
        """What a snapshot holds: the trained parameters (the others never change)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def _snapshot(self, version: int) -> None:
        with torch.no_grad():
            self.snapshots.append((version, [p.detach().clone() for p in self._params()]))
        keep = self.delay + 1 if self.delay else 1
        while len(self.snapshots) > keep:
            self.snapshots.popleft()

    @contextmanager
    def _swapped(self, version: int):
        """The model holds the snapshot of ``version`` inside the block, its own weights after."""
        saved = dict(self.snapshots)[version]
        params = self._params()
        with torch.no_grad():
            current = [p.detach().clone() for p in params]
            for p, s in zip(params, saved):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, c in zip(params, current):
                    p.copy_(c)
