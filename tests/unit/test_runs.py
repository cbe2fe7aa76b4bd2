"""Per-token versions and loss masks travel as runs: hand vectors, a random round trip, and every
malformed run refused on decode naming the field."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from areal_like.wire import protocol as P
from areal_like.wire.trajectory import RUNS, Trajectory, runs_array, runs_of, runs_ok
from buffer.credits import version_range


def pairs(*values: int) -> bytes:
    return np.asarray(values, "<i4").tobytes()


@pytest.mark.parametrize(("full", "want"), [
    ([], pairs()),
    ([3], pairs(3, 1)),
    ([3, 3, 3, 3], pairs(3, 4)),
    ([0, 2, 2, 2, 3], pairs(0, 1, 2, 4, 3, 5)),
    ([1, 0, 0, 1, 1], pairs(1, 1, 0, 3, 1, 5)),
    ([-7, 2**31 - 1, 2**31 - 1], pairs(-7, 1, 2**31 - 1, 3)),
])
def test_runs_by_hand(full, want):
    wire = runs_of(full, "versions")
    assert wire[0] == RUNS and wire[1] == len(full) and wire[2].tobytes() == want and runs_ok(wire)
    back = runs_array(wire)
    assert back.dtype == np.dtype("<i4") and back.tolist() == full and not back.flags.writeable


def test_random_arrays_round_trip_through_a_frame():
    rng = np.random.default_rng(7)
    for _ in range(200):
        n = int(rng.integers(0, 60))
        versions = np.sort(rng.integers(0, 4, n)).astype(np.int32)
        mask = (rng.random(n) < 0.7).astype(np.int32)
        t = Trajectory.of(prompt_ids=[1], output_ids=np.arange(n), behav_logp=np.zeros(n),
                          versions=versions, loss_mask=mask, reward=0.0, finish_reason="stop")
        back = P.decode(P.encode(group(t))).trajectories[0]
        assert (back.versions.tolist() == versions.tolist()
                and back.loss_mask.tolist() == mask.tolist())
        assert back.head_version == (int(versions.min()) if n else 0)
        runs = 1 + int(np.count_nonzero(versions[1:] != versions[:-1])) if n else 0
        assert back.versions_wire[2].nbytes == 8 * runs  # one pair per run: nothing more travels


def group(*trajs: Trajectory) -> P.TrajectoryGroup:
    return P.TrajectoryGroup(group_id="g", server_id="s", lease_id="l", prompt_index=0, epoch=0,
                             trajectories=list(trajs))


def group_frame(**runs: bytes) -> dict:
    t = Trajectory.of(prompt_ids=[1], output_ids=[5, 6, 7, 8], behav_logp=[0.0] * 4,
                      versions=[2, 2, 3, 3], reward=0.0, finish_reason="stop")
    wire = msgpack.unpackb(P.encode(group(t)))
    for name, data in runs.items():
        wire["trajectories"][0][name][2] = data
    return wire


@pytest.mark.parametrize("name", ["versions", "loss_mask"])
@pytest.mark.parametrize("data", [
    pairs(), pairs(1, 3), pairs(1, 5), pairs(1, 0, 1, 4), pairs(1, 2, 1, 2, 1, 4),
    pairs(1, 3, 2, 1, 3, 4), pairs(1, 4, 0), pairs(1, 1, 1, 2, 1, 3, 1, 4, 1, 4), pairs(1, -4),
    b"\x01", pairs(1, 1, 2, 3), pairs(1, 2, 2, 5),
], ids=["empty", "short", "long", "zero-end", "repeated-end", "decreasing", "odd-size",
        "too-many", "negative", "one-byte", "runs-short", "runs-long"])
def test_a_malformed_run_is_refused_naming_the_field(name, data):
    with pytest.raises(P.ProtocolError, match="runs must be") as info:
        P.decode(msgpack.packb(group_frame(**{name: data})))
    assert info.value.field == f"trajectories[0].{name}"


def test_runs_of_an_empty_response_and_a_wrong_tag():
    wire = group_frame()
    # a full array where runs belong (a version-2 sender)
    wire["trajectories"][0]["versions"][0] = "<i4"
    with pytest.raises(P.ProtocolError) as info:
        P.decode(msgpack.packb(wire))
    assert info.value.field == "trajectories[0].versions"
    wire = group_frame()
    # runs for tokens the response does not have
    wire["trajectories"][0]["versions"] = [RUNS, 0, pairs(2, 4)]
    with pytest.raises(P.ProtocolError):
        P.decode(msgpack.packb(wire))


def test_the_buffer_reads_version_ranges_from_the_runs():
    def traj(versions):
        n = len(versions)
        return Trajectory.of(prompt_ids=[1], output_ids=np.arange(n), behav_logp=np.zeros(n),
                             versions=versions, reward=0.0, finish_reason="stop")

    assert traj([2, 2, 3, 3, 2]).version_values.tolist() == [2, 3, 2]
    assert version_range(group(traj([2, 2, 3, 3]), traj([4]))) == (2, 4, 2)
    # an empty response counts as version 0
    assert version_range(group(traj([5, 6]), traj([]))) == (5, 6, 0)
    assert version_range(group(traj([]))) == (0, 0, 0)


def test_decoded_and_built_runs_are_read_only_and_odd_buffers_decode():
    t = Trajectory.of(prompt_ids=[1], output_ids=[5, 6, 7], behav_logp=[0.0] * 3,
                      versions=[1, 2, 2], reward=0.0, finish_reason="stop")
    with pytest.raises(ValueError):
        t.version_values[0] = 9  # a view of the runs: writing it would change versions
    frame = P.encode(group(t))
    # a 2-D view
    square = memoryview(frame + bytes(-len(frame) % 8)).cast("B", (8, (len(frame) + 7) // 8))
    with pytest.raises(P.ProtocolError):  # trailing zero bytes: not one frame, but refused as such
        P.decode(square)
    exact = memoryview(bytearray(frame)).cast("B", (1, len(frame)))
    assert P.decode(exact).trajectories[0].versions.tolist() == [1, 2, 2]
