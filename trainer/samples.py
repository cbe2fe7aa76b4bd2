"""Sample rows: a few of the trajectories a training step consumed, as text, for ``samples.jsonl``.

A pure function of the groups and a decoder (trainer rank 0 appends the rows every
``tracking.sample_every`` steps). Row keys: ``step``, ``policy_version``, ``prompt``,
``response``, ``reward``, ``versions`` (``[min, max]``), ``staleness``, ``finish_reason``; a
reward model's adds the rule's ``rule_reward`` and a process reward model's ``process_rewards``
(``[[token, reward], ...]``, rollout_server/ROLLOUT.md "Reward models"); a list of reward
functions adds ``rewards`` (each one's reward, by its name); a multi-turn
trajectory adds ``turns`` (of an agent episode's part: its calls), ``masked_share`` and
``segments`` (runs of one source and version, ``{"source", "version", "text"}``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from areal_like.wire.protocol import TrajectoryGroup


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
        mask = t.loss_mask
        multiturn = bool(len(mask)) and not mask.all()
        if multiturn:
            text = decode(t.output_ids.tolist())
        rows.append({
            "step": version + 1, "policy_version": version,
            "prompt": decode(t.prompt_ids.tolist()),
            "response": text if isinstance(text, str) else decode(t.output_ids.tolist()),
            "reward": float(t.reward),
            "versions": [int(versions.min()), int(versions.max())] if len(versions) else [],
            "staleness": version - group.head_version,
            "finish_reason": t.finish_reason,
        })
        # a reward model's (ROLLOUT.md); each task.reward_fn function's
        for key in ("rule_reward", "process_rewards", "rewards"):
            if key in t.metadata:
                rows[-1][key] = t.metadata[key]
        if multiturn:
            turns = t.metadata.get("turns", t.metadata.get("calls"))  # an agent's: its calls
            rows[-1].update(turns=turns, masked_share=float(1.0 - mask.mean()),
                            segments=segments(t.output_ids.tolist(), mask.tolist(),
                                              versions.tolist(), decode))
    return rows


def segments(ids: list[int], mask: list[int], versions: list[int],
             decode: Callable[[list[int]], str]) -> list[dict]:
    """Runs of consecutive tokens with the same source and version, decoded."""
    out: list[dict] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (mask[i], versions[i]) != (mask[start], versions[start]):
            out.append({"source": "generated" if mask[start] else "context",
                        "version": versions[start],
                        "text": decode(ids[start:i])})
            start = i
    return out


def reward_fn_means(groups: Sequence[TrajectoryGroup]) -> dict[str, float]:
    """Each reward function's mean reward over the groups' trajectories (their ``rewards``
    metadata, by function name; a None, TRL's "not mine to score", is left out); empty when no
    trajectory carries it."""
    values: dict[str, list[float]] = {}
    for g in groups:
        for t in g.trajectories:
            for name, value in t.metadata.get("rewards", {}).items():
                if value is not None:
                    values.setdefault(name, []).append(float(value))
    return {name: sum(v) / len(v) for name, v in values.items()}
