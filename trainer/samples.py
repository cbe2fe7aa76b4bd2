"""Sample rows: a few of the trajectories a training step consumed, as text, for ``samples.jsonl``.

Every ``tracking.sample_every`` steps trainer rank 0 appends up to ``tracking.sample_k`` rows to
``<run_dir>/samples.jsonl``; the tracker sink (``areal_like/tracking.py``) forwards each step's rows
as one table. This module only builds the rows (a pure function of the groups and a decoder).

Row keys: ``step`` (the trainer step the batch produced, as in ``metrics/trainer.jsonl``),
``policy_version`` (the trainer's version when it consumed the batch), ``prompt``, ``response``
(the engine's text when the trajectory carries ``metadata["text"]``, else the decoded output ids),
``reward``, ``versions`` (``[min, max]`` of the token versions; ``[]`` for an empty response),
``staleness`` (``policy_version`` - the group's head version) and ``finish_reason``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from areal_like.protocol import TrajectoryGroup


def sample_rows(groups: Sequence[TrajectoryGroup], version: int, k: int,
                decode: Callable[[list[int]], str]) -> list[dict]:
    """Up to ``k`` rows, round-robin over the groups (trajectory 0 of each group first) so that a
    table shows as many different prompts as it can; ``version`` is the trainer's version when it
    consumed ``groups``."""
    picked: list[tuple[TrajectoryGroup, int]] = []
    depth = max((len(g.trajectories) for g in groups), default=0)
    for j in range(depth):
        picked += [(g, j) for g in groups if j < len(g.trajectories)]
    rows = []
    for group, j in picked[:k]:
        t = group.trajectories[j]
        text = t.metadata.get("text")
        versions = t.versions
        rows.append({
            "step": version + 1, "policy_version": version,
            "prompt": decode(t.prompt_ids.tolist()),
            "response": text if isinstance(text, str) else decode(t.output_ids.tolist()),
            "reward": float(t.reward),
            "versions": [int(versions.min()), int(versions.max())] if len(versions) else [],
            "staleness": version - group.head_version,
            "finish_reason": t.finish_reason,
        })
    return rows
