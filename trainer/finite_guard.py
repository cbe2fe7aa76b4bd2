"""Finite numbers or no step: the trainer never applies an update it cannot trust.

- ``all_finite`` is a collective: every rank skips the same non-finite step (``trainer/step.py``).
- ``SkipTracker`` (rank 0 reports) counts, logs at most once a minute, exports
  ``trainer/nonfinite_steps`` and ``trainer/nonfinite_consecutive``, and raises
  ``NonFiniteStepError`` after ``trainer.max_nonfinite_skips`` skips in a row.
- ``require_finite_state`` runs before every checkpoint save (``NonFiniteStateError``).
"""

from __future__ import annotations

import logging
import math

import torch
from torch.optim import Optimizer

from areal_like.net.ratelog import RateLimitedLog
from trainer.ranks import all_ranks, local

SKIPPED = "nonfinite_skipped"  # the step stat: optimizer steps of the batch that were skipped
LOG_EVERY_S = 60.0

log = logging.getLogger("trainer.finite_guard")


class NonFiniteStepError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


class NonFiniteStateError(RuntimeError):
    """A weight or optimizer state is not finite: it must not be checkpointed."""


def all_finite(*values: float) -> bool:
    """Whether every value is finite on EVERY rank (a collective with several ranks: all call
    it)."""
    return all_ranks(all(math.isfinite(v) for v in values))


def first_nonfinite(model: torch.nn.Module, optimizer: Optimizer | None = None) -> str | None:
    """The name of this rank's first parameter (or optimizer state entry) shard holding a
    non-finite value; None when all are finite. Local: no collective."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(local(p.detach())).all()):
            return name
    for i, state in enumerate(optimizer.state.values() if optimizer is not None else ()):
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and not bool(torch.isfinite(local(value)).all()):
                return f"optimizer state {i}.{key}"
    return None


def require_finite_state(model: torch.nn.Module, optimizer: Optimizer | None = None) -> None:
    """Raise ``NonFiniteStateError`` on every rank when any rank's weights or optimizer state hold
    a non-finite value (a collective: all ranks call it)."""
    bad = first_nonfinite(model, optimizer)
    if not all_ranks(bad is None):
        where = f" (this rank: {bad})" if bad else " (on another rank)"
        raise NonFiniteStateError(f"the model's state holds NaN or inf{where}: refusing to "
                                  "checkpoint it; the newest checkpoint on disk is the last "
                                  "finite one")


class SkipTracker:
    """Skipped steps of the trainer loop: counted, logged (rate-limited), exported, bounded."""

    def __init__(self, max_consecutive: int, metrics=None):
        """``metrics``: the daemon's (rank 0); None on the other ranks, which count and stop alike
        (their stats are the same reduced numbers) but neither log nor export."""
        self.max_consecutive, self.metrics = max_consecutive, metrics
        self.total = self.consecutive = 0
        self.lines = RateLimitedLog(log, LOG_EVERY_S)

    def observe(self, version: int, stats: dict[str, float]) -> None:
        """Count the step that made ``version`` from its stats; raise ``NonFiniteStepError`` once
        ``max_consecutive`` steps in a row skipped an optimizer step."""
        skipped = int(stats.get(SKIPPED, 0))
        self.total += skipped
        self.consecutive = self.consecutive + 1 if skipped else 0
        if self.metrics is not None:
            self.metrics.counter("trainer/nonfinite_steps", "optimizer steps skipped: loss or "
                                 "gradient norm not finite").inc(skipped)
            self.metrics.gauge("trainer/nonfinite_consecutive", "trainer steps in a row that "
                               "skipped an optimizer step").set(self.consecutive)
        if skipped and self.metrics is not None:
            self.lines.warning("skip", "step to version %d skipped %d optimizer step(s): loss=%s "
                               "grad_norm=%s (not finite; no update applied; %d skipped in all, %d "
                               "steps in a row)", version, skipped, stats.get("loss"),
                               stats.get("grad_norm"), self.total, self.consecutive)
        if skipped and self.consecutive >= self.max_consecutive:
            raise NonFiniteStepError(
                f"{self.consecutive} trainer steps in a row (up to version {version}) had a "
                f"non-finite loss or gradient norm (trainer.max_nonfinite_skips="
                f"{self.max_consecutive}): stopping. The weights were never updated by those steps "
                "and the checkpoints hold finite weights; look for bad data "
                "(areal_buffer_rejected_total) or a diverged model (lower trainer.lr)")
