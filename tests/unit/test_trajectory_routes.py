"""``Trajectory.routed_experts`` (routing replay): int32 ``[P + T - 1, layers, top_k]`` as raw
bytes, sent only when recorded (a trajectory without routes is the same frame as before), checked
against the trajectory's length, through a pickle and ``groups_to_batch`` unchanged."""

from __future__ import annotations

import pickle

import msgpack
import numpy as np
import pytest

from areal_like.wire import protocol as P
from areal_like.wire.codec import ProtocolError
from areal_like.wire.trajectory import Trajectory
from trainer.data import BatchSource, groups_to_batch


def traj(prompt: int = 3, out: int = 4, routes=None) -> Trajectory:
    return Trajectory.of(prompt_ids=np.arange(1, prompt + 1), output_ids=np.arange(out) + 10,
                         behav_logp=np.zeros(out, "<f4"), versions=np.zeros(out, "<i4"),
                         reward=1.0, finish_reason="stop", routed_experts=routes)


def group(*trajs: Trajectory) -> P.TrajectoryGroup:
    return P.TrajectoryGroup(group_id="s-1", server_id="s", lease_id="1", prompt_index=0, epoch=0,
                             trajectories=list(trajs))


ROUTES = np.arange(6 * 2 * 2).reshape(6, 2, 2) % 4  # 3 + 4 - 1 positions, 2 layers, top 2


def test_routes_travel_as_raw_int32_only_when_recorded_and_come_back_unchanged():
    frame = P.encode(group(traj(routes=ROUTES)))
    wire = msgpack.unpackb(frame)["trajectories"][0]["routed_experts"]
    assert wire == ["<i4", 24, ROUTES.astype("<i4").tobytes()]
    back = P.decode(frame).trajectories[0]
    assert back.routed_experts.tolist() == ROUTES.reshape(-1).tolist()
    assert pickle.loads(pickle.dumps(back)).routed_experts.tolist() == ROUTES.reshape(-1).tolist()
    bare = P.encode(group(traj()))  # no routes: no field, the frame as before
    assert "routed_experts" not in msgpack.unpackb(bare)["trajectories"][0]
    assert P.decode(bare).trajectories[0].routed_experts is None


def test_routes_of_another_length_are_refused_naming_the_field():
    with pytest.raises(ProtocolError, match="routed_experts"):
        traj(routes=np.zeros(7 * 2 * 2 + 1, "<i4"))


def test_the_batch_carries_the_routes_aligned_to_its_input_positions():
    short = np.full((3 + 2 - 1, 2, 2), 3)
    batch = groups_to_batch([group(traj(routes=ROUTES), traj(out=2, routes=short))], (2, 2))
    assert batch.routes.shape == (2, 7, 2, 2)
    assert batch.routes[0, :6].tolist() == ROUTES.tolist()
    assert batch.routes[1, :4].tolist() == short.tolist()
    # a position no forward of the engine fed (the last token, padding): any valid experts
    assert batch.routes[1, 4:].tolist() == [[[0, 1]] * 2] * 3
    assert groups_to_batch([group(traj(routes=ROUTES))]).routes is None


def test_with_replay_on_groups_without_their_routes_are_dropped_not_trained():
    source = BatchSource("inproc://none", 2, wait_s=1, buffer_timeout_s=1, rank=1,
                         route_shape=(2, 2))
    whole, bare, short = (group(traj(routes=ROUTES)), group(traj(routes=ROUTES), traj()),
                          group(traj(routes=ROUTES[:, :1])))
    assert source.usable([whole, bare, short]) == [whole]
    assert source.dropped_groups == 2
