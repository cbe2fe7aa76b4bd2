"""Weights-equal checks across processes, for the weight-sync benchmark and the engine's weight
tests (no production path needs them)."""

from __future__ import annotations

import torch


def state_checksum(model_or_state) -> float:
    """Order-independent float64 checksum of every parameter (a model, or a state dict of tensors
    or DTensors)."""
    state = model_or_state.state_dict() if hasattr(model_or_state, "state_dict") else model_or_state
    total = 0.0
    for i, (name, t) in enumerate(sorted(state.items())):
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        total += float(t.detach().to(torch.float64).sum()) * (1 + (i % 7) * 1e-3)
    return total
