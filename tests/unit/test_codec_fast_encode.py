"""A Trajectory takes any 1-D array-like and stores it in wire form (so both encoders write the
same bytes for it), refuses other shapes when built, and the generated fast encoder refuses what
is not a Trajectory (the reference path then names the field)."""

from __future__ import annotations

import numpy as np
import pytest

from areal_like import protocol as P
from areal_like.codec import _Refused


def traj(**arrays) -> P.Trajectory:
    fields = dict(prompt_ids=P.as_i32([1, 2]), output_ids=P.as_i32([5, 6, 7]), behav_logp=P.as_f32([-1, -2, -3]),
                  versions=P.as_i32([0, 0, 1]), reward=0.5, finish_reason="stop")
    return P.Trajectory(**{**fields, **arrays})


def group(t: P.Trajectory) -> P.TrajectoryGroup:
    return P.TrajectoryGroup(group_id="g", server_id="s", lease_id="l", prompt_index=0, epoch=0, trajectories=[t])


class Ids(np.ndarray):
    pass


@pytest.mark.parametrize("name,value", [
    ("output_ids", np.arange(6, dtype=np.int32)[::2]),  # exact dtype, strided view
    ("output_ids", np.arange(6, dtype=np.int32).reshape(3, 2)[:, 0]),  # exact dtype, column of a 2-D array
    ("behav_logp", np.asfortranarray(np.zeros(3, dtype=np.float32))),  # 1-D: contiguous either way, accepted
    ("output_ids", np.arange(3, dtype=np.int32).view(Ids)),  # ndarray subclass
    ("versions", np.arange(3, dtype=">i4")),  # big-endian int32
])
def test_fast_and_reference_encoders_agree(name, value):
    msg = group(traj(**{name: value}))
    expected = np.asarray(value).astype(P._ARRAY_DTYPES[P.F32 if name == "behav_logp" else P.I32])
    frame = P.encode(msg)
    assert frame == P._CODEC.encode(group(traj(**{name: np.ascontiguousarray(expected)})), P.MAX_FRAME_BYTES)
    assert getattr(P.decode(frame).trajectories[0], name).tolist() == expected.tolist()


@pytest.mark.parametrize("value", [np.arange(6, dtype=np.int32).reshape(2, 3), np.array(5, dtype=np.int32)])
def test_other_shapes_are_refused_when_a_trajectory_is_built(value):
    with pytest.raises(P.ProtocolError) as info:
        traj(prompt_ids=value)
    assert info.value.field == "prompt_ids" and "1-D" in str(info.value)


def test_fast_encoder_refuses_what_is_not_a_trajectory_and_encode_names_the_field():
    bad = P.TrajectoryGroup(group_id="g", server_id="s", lease_id="l", prompt_index=0, epoch=0,
                            trajectories=[{"prompt_ids": [1]}])
    with pytest.raises(_Refused):
        P._CODEC._fast_encoder(P.TrajectoryGroup)(bad)
    with pytest.raises(P.ProtocolError) as info:
        P.encode(bad)
    assert info.value.field == "trajectories[0]" and "expected Trajectory" in str(info.value)


FIRST_USE_RACE = """
import sys, threading
from areal_like import protocol as P
from areal_like.codec import Codec

traj = P.Trajectory(prompt_ids=P.as_i32([1]), output_ids=P.as_i32([2, 3]), behav_logp=P.as_f32([-1, -2]),
                    versions=P.as_i32([0, 0]), reward=1.0, finish_reason="stop")
messages = [P.Ack(ref="x", status="ok"), P.TrajectoryGroup(group_id="g", server_id="s", lease_id="1", prompt_index=0,
                                                          epoch=0, trajectories=[traj])]
frames = [P.encode(m) for m in messages]
wrong = 0
for _ in range(int(sys.argv[1])):
    codec = Codec(base=P.Message, top_level=P.TOP_LEVEL_TYPES, array_dtypes=P._ARRAY_DTYPES,
                  version=P.PROTOCOL_VERSION)  # fresh: every fast path is built on first use
    start, got = threading.Barrier(8), []

    def first_use(i):
        start.wait()  # all threads at once
        if i < 6:  # mostly decoders: building msgspec's decoder is where the threads collided
            got.append(P.encode(codec.decode(frames[i % 2], 1 << 20)) == frames[i % 2])
        else:
            got.append(codec.encode(messages[i % 2], 1 << 20) == frames[i % 2])

    threads = [threading.Thread(target=first_use, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wrong += got.count(False) + 8 - len(got)
print("wrong", wrong)
"""


def test_threads_that_use_a_new_codec_at_once_get_the_same_results(spawn_python):
    """The fast paths are built on first use. Threads arriving at once (the producers of a
    multi-threaded rollout server, a test's drivers) must wait for one build: without the lock
    msgspec crashed the process (SIGSEGV) in 4 of 5 runs of this check. In a subprocess, so a crash
    fails the test instead of ending pytest."""
    proc = spawn_python(FIRST_USE_RACE, ["500"])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert out.split() == ["wrong", "0"], (out, err[-3000:])
