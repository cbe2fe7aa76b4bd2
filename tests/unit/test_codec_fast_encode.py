"""The generated fast encoder refuses every array it cannot write as-is (the reference path then
coerces or names the field), and writes the same bytes as the reference encoder for the rest."""

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
def test_fast_encoder_refuses_other_shapes_and_encode_names_the_field(value):
    t = traj(prompt_ids=value)
    with pytest.raises(_Refused):
        P._CODEC._fast_encoder(P.Trajectory)(t)
    with pytest.raises(P.ProtocolError) as info:
        P.encode(group(t))
    assert info.value.field == "trajectories[0].prompt_ids"
