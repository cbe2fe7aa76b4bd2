"""What a trajectory group must hold before anyone trains on it: at most the trajectories a group
of the job holds, a non-empty prompt and output in every trajectory, a loss mask of 0s and 1s, at
most the model's context in prompt and output together, token ids in ``[0, vocab_size)``, and
behaviour log-probs that are finite and within ``[LOGP_MIN, LOGP_MAX]``, process rewards
(a process reward model's ``process_rewards`` metadata, ``[[t, reward], ...]``) on output tokens
with finite values, and routing-replay routes of the model's shape naming its experts. Why each:
areal_like/DESIGN.md section 3.

One check for two places: the buffer refuses such a group at admission and the trainer drops one
that reaches it anyway. A reason's text up to the first ``:`` is its metric label.
"""

from __future__ import annotations

import math

import numpy as np

from areal_like.wire.protocol import TrajectoryGroup
from areal_like.wire.trajectory import mask_values_ok

# The prompt is what is wrong: it would come back the same, so it is skipped this epoch. Any other
# reason ("nonfinite_logp", "empty_output": the engine's doing, not the prompt's) has the prompt
# generated again (buffer/service.py ``_retry``).
REASONS = ("empty_prompt", "no_room", "bad_loss_mask", "token_out_of_vocab")
# the finish_reason of a trajectory whose prompt was never sent: it leaves the engine no room to
# generate (rollout_server/episode.py ``output_room``)
NO_ROOM = "no_room"
LOGP_MIN, LOGP_MAX = -100.0, 0.1  # plausible behaviour log-probs (module docstring)


def content_problem(group: TrajectoryGroup, vocab_size: int, context: int = 0,
                    trajectories: int = 0,
                    routes: tuple[int, int, int] | None = None) -> str | None:
    """Why the group cannot be trained on by a model with ``vocab_size`` entries and a context of
    ``context`` tokens, in a job whose groups hold at most ``trajectories`` (None: it can); a value
    <= 0 skips its check. No engine makes a longer trajectory or a bigger group, and a step's cost
    grows with the square of its longest sequence (a 4 MiB frame holds 500k tokens) and with its
    rows (thousands of short ones fit a frame). ``routes``: (layers, top_k, experts) of routing
    replay (``routes_problem``; None: unchecked)."""
    if 0 < trajectories < len(group.trajectories):
        return (f"too_many_trajectories: {len(group.trajectories)}, more than the {trajectories} "
                "a group of this job holds (task.group_size; times task.max_turns for an agent)")
    arrays = []
    for i, t in enumerate(group.trajectories):
        if len(t.prompt_ids) == 0:
            return (f"empty_prompt: trajectory {i} has no prompt tokens (its first output token "
                    "has nothing to follow)")
        if t.n_tokens == 0 and t.finish_reason == NO_ROOM:
            return (f"no_room: trajectory {i} has no output tokens: its prompt of "
                    f"{len(t.prompt_ids)} tokens leaves the engine no room to generate")
        if t.n_tokens == 0:  # its version would be 0: its group judged stale by that
            return (f"empty_output: trajectory {i} has no output tokens (nothing to train on: the "
                    "engine answered none, or a first turn was cut by a timeout)")
        if not mask_values_ok(t.loss_mask_wire):
            return (f"bad_loss_mask: trajectory {i} has loss_mask values other than 0 (context) "
                    "and 1 (generated)")
        if 0 < context < (n := len(t.prompt_ids) + t.n_tokens):
            return (f"over_context: trajectory {i} has {n} prompt and output tokens, more than the "
                    f"model's context of {context}")
        arrays += [t.prompt_ids, t.output_ids]
    if (why := logp_problem(group) or process_problem(group)
            or (routes_problem(group, *routes) if routes else None)) is not None:
        return why
    if vocab_size <= 0 or not arrays:
        return None
    ids = np.concatenate(arrays)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        return f"token_out_of_vocab: token id {bad} is outside [0, {vocab_size}) (model.vocab_size)"
    return None


def process_problem(group: TrajectoryGroup) -> str | None:
    """Why a trajectory's ``process_rewards`` metadata cannot be trained on (None: absent, or
    ``[t, reward]`` pairs with t an output token's index and a finite reward)."""
    for i, t in enumerate(group.trajectories):
        pairs = t.metadata.get("process_rewards", [])
        ok = isinstance(pairs, list) and all(
            isinstance(p, list | tuple) and len(p) == 2 and type(p[0]) is int
            and 0 <= p[0] < t.n_tokens and isinstance(p[1], int | float) and math.isfinite(p[1])
            for p in pairs)
        if not ok:
            return (f"bad_process_rewards: trajectory {i} has process_rewards other than [t, "
                    f"reward] pairs with t in [0, {t.n_tokens}) and a finite reward")
    return None


def logp_problem(group: TrajectoryGroup) -> str | None:
    """Why the group's behaviour log-probs cannot be trained on (None: finite and plausible)."""
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


def routes_problem(group: TrajectoryGroup, layers: int, top_k: int, experts: int) -> str | None:
    """Why a trajectory's routing-replay routes cannot be replayed by a model of ``layers`` mixture
    layers routing each token to ``top_k`` of ``experts`` experts (None: they can, or it carries
    none: the trainer drops such a group itself). An expert id out of range fails the replayed
    forward, and with it the trainer's whole batch."""
    for i, t in enumerate(group.trajectories):
        r = t.routed_experts
        if r is None:
            continue
        rows = len(t.prompt_ids) + t.n_tokens - 1
        if len(r) != rows * layers * top_k:
            return (f"bad_routes: trajectory {i} has {len(r)} routed_experts, not [{rows} "
                    f"positions, {layers} layers, top_k {top_k}] (the model's)")
        lo, hi = (int(r.min()), int(r.max())) if len(r) else (0, 0)
        if lo < 0 or hi >= experts:
            return (f"bad_routes: trajectory {i} routes to expert {lo if lo < 0 else hi}, outside "
                    f"[0, {experts}) (the model's num_experts)")
    return None
