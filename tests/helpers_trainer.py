"""Trainer helpers for tests (no production path needs them)."""

from __future__ import annotations

import torch

from trainer.ranks import full


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a full CPU tensor, on every rank (a collective: all ranks must call
    it)."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = full(p).detach().to("cpu", torch.float32).clone()
    return out
