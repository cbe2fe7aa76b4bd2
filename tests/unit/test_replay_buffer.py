"""ReplayBuffer: selection order, exactly-n-or-nothing, the consume-time invariant, filters,
capacity."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from areal_like.wire.protocol import TrajectoryGroup
from areal_like.wire.trajectory import Trajectory, as_f32, as_i32
from buffer.replay_buffer import ReplayBuffer
from buffer.staleness import StalenessPolicy


def make_group(gid: str, head: int, rewards=(0.0, 1.0), tokens: int = 4) -> TrajectoryGroup:
    first = np.full(tokens, head + 1)
    first[0] = head  # head version = min over tokens
    trajs = [Trajectory.of(prompt_ids=as_i32([5, 6]), output_ids=as_i32(np.arange(tokens)),
                        behav_logp=as_f32(np.full(tokens, -0.5)),
                        versions=first if i == 0 else np.full(tokens, head + 1),
                        reward=float(r), finish_reason="stop") for i, r in enumerate(rewards)]
    return TrajectoryGroup(group_id=gid, server_id="s", lease_id=gid, prompt_index=0, epoch=0,
                           trajectories=trajs)


def make_buffer(eta=1, selection="oldest", capacity=100, **kw) -> ReplayBuffer:
    return ReplayBuffer(StalenessPolicy(eta, 2, 64), capacity=capacity, selection=selection, **kw)


@pytest.mark.parametrize("selection,expected", [
    ("oldest", ["b", "d", "c", "a"]),  # head 1 (arrival order), then 2, then 3
    ("newest", ["a", "c", "b", "d"]),
    ("fifo", ["a", "b", "c", "d"]),
])
def test_selection_order(selection, expected):
    buf = make_buffer(eta=5, selection=selection)
    for gid, head in [("a", 3), ("b", 1), ("c", 2), ("d", 1)]:
        buf.add(make_group(gid, head))
    assert [g.group_id for g in buf.take_stored(4, 3)] == expected
    assert len(buf) == 0 and buf.nbytes == 0


def test_take_stored_is_exactly_n_or_nothing():
    buf = make_buffer()
    for i in range(3):
        buf.add(make_group(f"g{i}", 0), nbytes=10)
    assert buf.take_stored(4, 0) is None and len(buf) == 3  # nothing removed
    assert buf.take_stored(3, 0, max_bytes=25) is None and len(buf) == 3  # over the frame budget
    assert len(buf.take_stored(2, 0, max_bytes=25)) == 2 and len(buf) == 1 and buf.nbytes == 10
    assert buf.take_stored(0, 0) is None


def test_stale_group_is_never_returned():
    buf = make_buffer(eta=1)
    for gid, head in [("old", 0), ("mid", 1), ("new", 2)]:
        buf.add(make_group(gid, head))
    assert buf.n_fresh(2) == 2
    assert buf.take_stored(3, 2) is None  # 3 groups stored, only 2 fresh at v = 2
    assert {g.group_id for g in buf.take_stored(2, 2)} == {"mid", "new"}
    assert [g.group_id for g in buf.drop_stale(2)] == ["old"] and len(buf) == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "take", "sweep"]), st.integers(0, 6),
                          st.integers(1, 4)),
                max_size=60), st.integers(0, 2), st.sampled_from(["oldest", "newest", "fifo"]))
def test_invariant_under_random_operations(ops, eta, selection):
    buf = make_buffer(eta=eta, selection=selection)
    version, stored = 0, set()
    for i, (op, x, n) in enumerate(ops):
        if op == "add":
            buf.add(make_group(f"g{i}", max(0, version - x // 2)))
            stored.add(f"g{i}")
        elif op == "take":
            version += x % 2  # the trainer sometimes moved on
            batch = buf.take_stored(n, version)
            if batch is not None:
                assert len(batch) == n
                assert all(version - g.head_version <= eta for g in batch)
                stored -= {g.group_id for g in batch}
        else:
            stored -= {g.group_id for g in buf.drop_stale(version)}
        assert len(buf) == len(stored)


def test_filters():
    buf = make_buffer(filter_equal_rewards=True, max_tokens_per_trajectory=8)
    assert buf.filter_reason(make_group("a", 0, rewards=(1.0, 1.0))) == "equal_rewards"
    assert buf.filter_reason(make_group("b", 0, rewards=(1.0, 0.0))) is None
    # one sample: no group baseline
    assert buf.filter_reason(make_group("c", 0, rewards=(1.0,))) is None
    assert buf.filter_reason(make_group("d", 0, tokens=9)) == "max_tokens"
    # filters off
    assert make_buffer().filter_reason(make_group("e", 0, rewards=(1.0, 1.0), tokens=99)) is None


def test_capacity_counts_in_flight_and_add_dedupes():
    buf = make_buffer(capacity=4)
    assert buf.free_slots(in_flight=3) == 1
    assert buf.add(make_group("a", 0)) and not buf.add(make_group("a", 0))
    assert len(buf) == 1 and buf.free_slots(in_flight=3) == 0 and buf.free_slots(in_flight=9) == 0
