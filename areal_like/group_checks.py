"""What a trajectory group must hold before anyone trains on it: a non-empty prompt in every
trajectory, a loss mask of 0s and 1s (decode checks only its length: this is the one pass over its
values), and token ids inside the model's vocabulary ``[0, vocab_size)``.

One check for two places: the buffer refuses such a group at admission (``Ack`` rejected with the
reason, counted in ``buffer/rejected``), and the trainer drops one that reaches it anyway (a WAL
written before the check, a buffer without it) instead of dying in an embedding lookup. The
reason's text up to the first ``:`` is its metric label. One pass over the token arrays.
"""

from __future__ import annotations

import numpy as np

from areal_like.protocol import TrajectoryGroup
from areal_like.trajectory import mask_values_ok

REASONS = ("empty_prompt", "bad_loss_mask", "token_out_of_vocab")


def content_problem(group: TrajectoryGroup, vocab_size: int) -> str | None:
    """Why the group's tokens cannot be trained on by a model with ``vocab_size`` entries (None: they
    can); ``vocab_size`` <= 0 skips the vocabulary check."""
    arrays = []
    for i, t in enumerate(group.trajectories):
        if len(t.prompt_ids) == 0:
            return f"empty_prompt: trajectory {i} has no prompt tokens (its first output token has nothing to follow)"
        if not mask_values_ok(t.loss_mask_wire):
            return f"bad_loss_mask: trajectory {i} has loss_mask values other than 0 (context) and 1 (generated)"
        arrays += [t.prompt_ids, t.output_ids]
    if vocab_size <= 0 or not arrays:
        return None
    ids = np.concatenate(arrays)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        return f"token_out_of_vocab: token id {bad} is outside [0, {vocab_size}) (model.vocab_size)"
    return None
