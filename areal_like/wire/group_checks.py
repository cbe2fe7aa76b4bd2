"""What a trajectory group must hold before anyone trains on it: a non-empty prompt in every
trajectory, a loss mask of 0s and 1s (decode checks only its length: this is the one pass over its
values), token ids inside the model's vocabulary ``[0, vocab_size)``, and finite behaviour
log-probs.

Finite numbers: ``behav_logp`` is the one float array of a group, and every off-policy kernel
divides by ``exp(behav_logp)`` (trainer/LOSSES.md), so a NaN or an infinity in it makes the loss
or its gradient non-finite, and one such group can destroy the weights. NaN, +inf and -inf are all
refused, -inf included: a real engine can report -inf for a token (a logit masked to -inf, or an
underflow at a low temperature), but a token its own sampler gave probability 0 has an infinite
importance ratio, which no kernel can train on. The reward, the only other float field that is
trained on, is refused when not finite by ``decode`` already (``areal_like/wire/trajectory.py``);
``metadata`` is free-form and never trained on.

Plausible numbers: a finite log-prob can still be absurd. A log-prob is at most 0, and a token the
engine sampled had a real chance: below ``LOGP_MIN`` (-100, probability e^-100 ~ 4e-44) no sampler
picks a token in the life of any cluster (the whole mass of such tokens is under vocab x e^-100),
while a member reporting -1e30 makes the importance ratio overflow to inf in fp32 (``exp`` overflows
past 88) exactly as a NaN would. Values outside ``[LOGP_MIN, LOGP_MAX]`` are refused with the
reason ``implausible_logp``; ``LOGP_MAX`` (0.1) leaves room for a low-precision engine's rounding
above 0. Like ``nonfinite_logp`` it is the engine's numbers, not the prompt, that are wrong.

One check for two places: the buffer refuses such a group at admission (``Ack`` rejected with the
reason, counted in ``buffer/rejected``), and the trainer drops one that reaches it anyway (a WAL
written before the check, a buffer without it) instead of dying in an embedding lookup. The
reason's text up to the first ``:`` is its metric label. One pass over the token arrays.
"""

from __future__ import annotations

import numpy as np

from areal_like.wire.protocol import TrajectoryGroup
from areal_like.wire.trajectory import mask_values_ok

# The prompt is what is wrong: it would come back the same, so it is skipped this epoch. Any other
# reason ("nonfinite_logp": the engine's numbers, not the prompt) has the prompt generated again.
REASONS = ("empty_prompt", "bad_loss_mask", "token_out_of_vocab")
LOGP_MIN, LOGP_MAX = -100.0, 0.1  # plausible behaviour log-probs (module docstring)


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
    if (why := logp_problem(group)) is not None:
        return why
    if vocab_size <= 0 or not arrays:
        return None
    ids = np.concatenate(arrays)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        return f"token_out_of_vocab: token id {bad} is outside [0, {vocab_size}) (model.vocab_size)"
    return None


def logp_problem(group: TrajectoryGroup) -> str | None:
    """Why the group's behaviour log-probs cannot be trained on (None: all finite and plausible);
    see the module docstring for why -inf and values outside ``[LOGP_MIN, LOGP_MAX]`` are refused.
    One pass over the log-prob arrays."""
    for i, t in enumerate(group.trajectories):
        logp = t.behav_logp
        if len(logp) and not np.isfinite(logp).all():
            at = np.flatnonzero(~np.isfinite(logp))
            return (f"nonfinite_logp: trajectory {i} has {len(at)} behav_logp value(s) that are "
                    f"not finite (first {float(logp[at[0]])}, at token {int(at[0])})")
        if len(logp) and (logp.min() < LOGP_MIN or logp.max() > LOGP_MAX):
            at = np.flatnonzero((logp < LOGP_MIN) | (logp > LOGP_MAX))
            return (f"implausible_logp: trajectory {i} has {len(at)} behav_logp value(s) outside "
                    f"[{LOGP_MIN}, {LOGP_MAX}] (first {float(logp[at[0]])}, at token {int(at[0])})")
    return None
