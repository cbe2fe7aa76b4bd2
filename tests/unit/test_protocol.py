"""Wire protocol: round trips per message type, strict rejection naming fields, fuzzed decode."""

from __future__ import annotations

import copy
import gc
import math
import pickle
import random
import sys
import typing
import weakref

import msgpack
import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from areal_like.weights.plan import SyncDone, SyncMember, WeightSyncPlan
from areal_like.wire import protocol as P
from areal_like.wire.codec import field_names
from areal_like.wire.trajectory import Trajectory, as_f32, as_i32

# ---------------------------------------------------------------- strategies from the schema

INT = st.integers(-(2**63), 2**64 - 1)  # what msgpack carries
FLOAT = st.floats(allow_nan=False, allow_infinity=False)
TEXT = st.text(max_size=12)
JSON_LEAF = st.one_of(st.none(), st.booleans(), INT, FLOAT, TEXT, st.binary(max_size=8))
FREE_DICT = st.dictionaries(TEXT, st.recursive(JSON_LEAF, lambda c: st.lists(c, max_size=3)
                                               | st.dictionaries(TEXT, c, max_size=3),
                                               max_leaves=6), max_size=4)
MAX_TOKENS = 24


def _i32(n: int) -> st.SearchStrategy:
    return st.lists(st.integers(-(2**31), 2**31 - 1), min_size=n, max_size=n).map(as_i32)


def _f32(n: int) -> st.SearchStrategy:
    # any float32 bit pattern, NaNs included: logprob bytes are carried verbatim
    return st.lists(st.floats(width=32), min_size=n, max_size=n).map(as_f32)


@st.composite
def _trajectory(draw) -> Trajectory:
    t = draw(st.integers(0, MAX_TOKENS))
    return Trajectory.of(prompt_ids=draw(_i32(draw(st.integers(0, MAX_TOKENS)))),
                        output_ids=draw(_i32(t)),
                        behav_logp=draw(_f32(t)), versions=draw(_i32(t)), reward=draw(FLOAT),
                        finish_reason=draw(st.sampled_from(["stop", "length", "abort", "error"])),
                        metadata=draw(FREE_DICT))


# Classes whose validate() constrains several fields together get a hand-written strategy;
# single fields with a rule get an override; everything else is derived from the annotations.
CLASS_STRATEGIES: dict[type, st.SearchStrategy] = {Trajectory: _trajectory()}
FIELD_STRATEGIES = {
    (P.Ack, "status"): st.sampled_from(["accepted", "duplicate", "rejected", "ok"]),
    # a group's frame, encoded once by its sender
    (P.GroupSubmit, "group"): st.deferred(lambda: message_strategy(P.TrajectoryGroup)
                                          .map(P.encode_group)),
}


def strategy_for(tp) -> st.SearchStrategy:
    if isinstance(tp, type) and issubclass(tp, P.Message):
        return message_strategy(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:  # msgspec.Meta ranges: drawn inside (FLOAT is finite already)
        inner, meta = args
        if inner is int:
            return st.integers(meta.ge if meta.ge is not None else -(2**63),
                               meta.le if meta.le is not None else 2**64 - 1)
        if inner is str and meta.pattern:  # a peer's name or address: printable UTF-8 text
            return st.text(st.characters(codec="utf-8", min_codepoint=0x20,
                                         exclude_characters="\x7f"),
                           max_size=min(12, meta.max_length or 12))
        if typing.get_origin(inner) is list:
            return st.lists(strategy_for(typing.get_args(inner)[0]), min_size=meta.min_length or 0,
                            max_size=max(3, meta.min_length or 0))
        return strategy_for(inner)
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=3)
    if type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return st.none() | strategy_for(inner)
    if origin is dict:
        return FREE_DICT
    if origin is typing.Literal:
        return st.sampled_from(args)
    return {int: INT, float: FLOAT, bool: st.booleans(), str: TEXT}[tp]


def message_strategy(cls: type) -> st.SearchStrategy:
    if cls in CLASS_STRATEGIES:
        return CLASS_STRATEGIES[cls]
    fields = {f.name: FIELD_STRATEGIES[(cls, f.name)] if (cls, f.name) in FIELD_STRATEGIES
              else st.deferred(lambda tp=f.type: strategy_for(tp))
              for f in msgspec.structs.fields(cls) if f.name != "protocol"}
    return st.builds(cls, **fields)


def assert_same(a, b, path: str = "") -> None:
    """Field-by-field equality; arrays by dtype and bytes (NaN payloads included)."""
    if isinstance(a, P.Message):
        assert type(a) is type(b), path
        for name in field_names(type(a)):
            assert_same(getattr(a, name), getattr(b, name), f"{path}.{name}")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and b.dtype == a.dtype and b.tobytes() == a.tobytes(), path
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert type(b) is float and (a == b or (math.isnan(a) and math.isnan(b))), path
    else:
        assert a == b and type(a) is type(b), path


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("cls", sorted(P.TOP_LEVEL_TYPES.values(), key=lambda c: c.TYPE),
                         ids=lambda c: c.TYPE)
@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_round_trip_every_message_type(cls, data):
    msg = data.draw(message_strategy(cls))
    frame = P.encode(msg)
    back = P.decode(frame)
    assert type(back) is cls
    assert P.encode(back) == frame
    assert_same(msg, back)


def test_top_level_types_cover_design_messages():
    expected = {"register", "register_ack", "heartbeat", "heartbeat_ack", "credit_request",
                "credits", "trajectory_group", "ack", "batch_request", "batch", "version_update",
                "roster_request", "roster", "stats_request", "stats"}
    assert expected <= set(P.TOP_LEVEL_TYPES)
    # nested only, or a weight sync's structs (areal_like/weights/plan.py), which stay in the
    # trainer's process (it drives the members' engines itself): never a frame of their own
    assert not ({"trajectory", "credit", "bucket_spec", "sync_member", "roster_entry",
                 "weight_sync_plan", "sync_done", "sync_status_request", "sync_status"}
                & set(P.TOP_LEVEL_TYPES))
    plan = WeightSyncPlan(policy_version=1, group_name="g", master_addr="127.0.0.1",
                          master_port=29500, world_size=2, backend="gloo", reform=True,
                          members=[SyncMember(server_id="s", rank_offset=1)], buckets=[],
                          deadline_s=30.0)
    for struct in (plan, SyncDone(server_id="s", policy_version=1, ok=True), {"type": "ack"},
                   make_traj()):  # not a message, or nested only
        with pytest.raises(P.ProtocolError):
            P.encode(struct)  # type: ignore[arg-type]


def make_traj(t: int = 5, reward: float = 1.0, **kw) -> Trajectory:
    args = dict(prompt_ids=np.arange(3), output_ids=np.arange(t) + 10,
                behav_logp=-np.arange(t) / 10.0, versions=np.full(t, 7), reward=reward,
                finish_reason="stop", metadata={"k": [1, "x"]})
    return Trajectory.of(**{**args, **kw})


def make_group(n: int = 2, t: int = 5) -> P.TrajectoryGroup:
    return P.TrajectoryGroup(group_id="s-1", server_id="s", lease_id="1", prompt_index=4, epoch=0,
                             trajectories=[make_traj(t) for _ in range(n)])


@pytest.mark.parametrize("as_input", [bytes, bytearray, memoryview,
                                      lambda b: memoryview(bytearray(b))],
                         ids=["bytes", "bytearray", "memoryview", "writable-memoryview"])
def test_arrays_decode_as_readonly_zero_copy_views_of_the_right_values(as_input):
    frame = P.encode(make_group())
    back = P.decode(as_input(frame))
    traj = back.trajectories[0]
    assert traj.output_ids.tolist() == [10, 11, 12, 13, 14] and traj.versions.tolist() == [7] * 5
    np.testing.assert_array_equal(traj.behav_logp, np.float32(-np.arange(5) / 10.0))
    assert back.head_version == 7 and back.n_tokens == 10
    for name, dtype in (("prompt_ids", np.int32), ("output_ids", np.int32),
                        ("behav_logp", np.float32)):
        arr = getattr(traj, name)
        assert (type(arr) is np.ndarray and arr.dtype == np.dtype(dtype)
                and arr.dtype.byteorder in "<=")
        assert not arr.flags.writeable and not arr.flags.owndata  # numpy.frombuffer over the frame
        assert isinstance(arr.base, memoryview) and arr.base.readonly
        if as_input is bytes:
            assert arr.base.obj is frame  # no copy of the array bytes at all
    # runs, expanded on access into a read-only array of their own
    for name in ("versions", "loss_mask"):
        arr, runs = getattr(traj, name), getattr(traj, f"{name}_wire")[2]
        assert arr.dtype == np.dtype(np.int32) and not arr.flags.writeable and len(arr) == 5
        assert runs.readonly and (as_input is not bytes or runs.obj is frame)
    assert P.encode(back) == frame


def test_arrays_travel_as_raw_bytes_not_lists():
    wire = msgpack.unpackb(P.encode(make_group(1, 3)))
    assert wire["trajectories"][0]["output_ids"] == ["<i4", 3,
                                                     np.arange(10, 13, dtype="<i4").tobytes()]
    assert wire["trajectories"][0]["behav_logp"][0] == "<f4"
    # versions and the mask as runs, (value, end) pairs: one run each here
    assert wire["trajectories"][0]["versions"] == ["runs<i4", 3, np.array([7, 3], "<i4").tobytes()]
    assert wire["trajectories"][0]["loss_mask"] == ["runs<i4", 3, np.array([1, 3], "<i4").tobytes()]
    assert wire["protocol"] == P.PROTOCOL_VERSION and wire["type"] == "trajectory_group"


def test_senders_use_plain_types_and_encode_refuses_others():
    class Name(str):
        pass

    for bad in (P.VersionUpdate(policy_version=np.int64(3)), P.Ack(ref=Name("g"), status="ok"),
                P.Stats(values={"a": object()})):
        for encode in (P.encode, lambda msg: P.encode_into(msg, bytearray())):
            with pytest.raises(P.ProtocolError) as info:
                encode(bad)
            assert info.value.field == "frame"


def test_trajectory_of_converts_array_likes_to_the_wire_dtypes():
    # list, int64, strided float64
    traj = make_traj(output_ids=[10, 11, 12, 13, 14], versions=np.full(5, 7, dtype=np.int64),
                     behav_logp=np.arange(10, dtype=np.float64)[::2],
                     prompt_ids=np.zeros(2))  # whole numbers as float64
    group = P.TrajectoryGroup(group_id="s-1", server_id="s", lease_id="1", prompt_index=4, epoch=0,
                              trajectories=[traj])
    back = P.decode(P.encode(group)).trajectories[0]
    assert back.output_ids.tolist() == [10, 11, 12, 13, 14] and back.versions.dtype == np.int32
    assert back.behav_logp.tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert back.prompt_ids.tolist() == [0, 0] and back.prompt_ids.dtype == np.int32
    equal_dtype = np.arange(5, dtype=pickle.loads(pickle.dumps(np.dtype("<i4"))))  # not the same
    assert np.shares_memory(make_traj(output_ids=equal_dtype).output_ids, equal_dtype)  # no copy


@pytest.mark.parametrize("field,value,says", [
    ("output_ids", ["a", "b", "c", "d", "e"], "expected integers"),  # a str array
    ("output_ids", 7, "1-D"), ("prompt_ids", np.array(5), "1-D"),
    ("prompt_ids", np.zeros((2, 3), dtype=np.int32), "1-D"),
    ("prompt_ids", b"\1\0\0\0", "raw bytes"), ("output_ids", np.arange(5) + 2**40, "outside <i4"),
    ("output_ids", np.arange(5) + 0.5, "whole numbers"),
    ("versions", np.full(5, np.nan), "whole numbers"),
    ("versions", np.ones(5, dtype=bool), "expected integers"),
    *((name, np.zeros(3, dtype=np.int32), "output_ids") for name in ("behav_logp", "versions")),
    # an environment's NaN or non-real reward fails its episode when built
    *(("reward", bad, "expected float") for bad in ("1.0", True, np.bool_(True), None)),
    *(("reward", bad, "finite")
      for bad in (10**400, np.float64("nan"), math.nan, math.inf, -math.inf)),
])
def test_trajectory_of_refuses_what_it_cannot_convert_naming_the_field(field, value, says):
    with pytest.raises(P.ProtocolError) as info:
        make_traj(**{field: value})
    assert info.value.field == field and says in str(info.value)


def test_a_decoded_trajectory_pickles_and_a_built_one_deep_copies():
    frame = P.encode(make_group())
    traj = P.decode(frame).trajectories[0]
    back = pickle.loads(pickle.dumps(traj))
    assert_same(traj, back)
    built = make_traj()
    twin = copy.deepcopy(built)
    assert_same(built, twin)
    assert (not np.shares_memory(twin.output_ids, built.output_ids)
            and twin.metadata is not built.metadata)
    assert "output_ids=array([10, 11, 12, 13, 14]" in repr(built)  # not the wire triples
    assert back.n_tokens == 5 and back.head_version == 7


def test_encode_into_writes_the_same_frame_into_a_kept_buffer():
    buffer = bytearray()
    for msg in (make_group(n=3, t=400), P.Ack(ref="g", status="ok"), make_group(n=1, t=7)):
        P.encode_into(msg, buffer)
        assert bytes(buffer) == P.encode(msg)


# ---------------------------------------------------------------- rejection, naming the field


def wire_of(msg: P.Message) -> dict:
    return msgpack.unpackb(P.encode(msg))


def reject(wire: dict) -> P.ProtocolError:
    with pytest.raises(P.ProtocolError) as info:
        P.decode(msgpack.packb(wire, use_bin_type=True))
    return info.value


def test_rejects_other_protocol_version():
    for bad in (P.PROTOCOL_VERSION + 1, 0, "1", None, 1.0, True):
        wire = wire_of(P.VersionUpdate(policy_version=3))
        wire["protocol"] = bad
        err = reject(wire)
        assert err.field == "protocol" and "unsupported protocol version" in str(err)


def _set(*path_value):
    """A mutation of a decoded frame: the value at ``path`` (a key ``...`` deleted)."""
    *path, value = path_value

    def mutate(wire):
        node = wire
        for key in path[:-1]:
            node = node[key]
        if value is ...:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return mutate


@pytest.mark.parametrize("msg, mutate, field", [
    *((P.VersionUpdate(policy_version=3), _set("type", bad), "type")
      for bad in ("no_such_message", "trajectory", "credit", 5, None)),  # unknown, nested only
    (make_group(), _set("server_id", ...), "server_id"),  # missing
    (make_group(), _set("trajectories", 1, "reward", ...), "trajectories[1].reward"),
    (make_group(), _set("surprise", 1), "surprise"),  # extra
    # only the top level carries the version
    (make_group(), _set("trajectories", 0, "protocol", 1), "trajectories[0].protocol"),
    (make_group(), _set("trajectories", []), "trajectories"),  # an empty group
    (P.Ack(ref="g", status="ok"), _set("status", "maybe"), "status"),
])
def test_rejects_unknown_types_missing_extra_and_empty_fields_naming_them(msg, mutate, field):
    wire = wire_of(msg)
    mutate(wire)
    assert reject(wire).field == field


@pytest.mark.parametrize("msg, name, default", [
    (P.Heartbeat(server_id="s", policy_version=2, in_flight=3), "in_flight", 0),
    (P.GroupSubmit(group=P.encode_group(make_group()), want_credits=2), "want_credits", 0),
    (P.Ack(ref="g", status="accepted", credits=[P.Credit(lease_id="L", prompt_index=0, epoch=0,
                                                         deadline_s=1.0)]), "credits", []),
], ids=lambda v: v if isinstance(v, str) else None)
def test_optional_fields_may_be_missing(msg, name, default):
    wire = wire_of(msg)
    del wire[name]
    assert getattr(P.decode(msgpack.packb(wire, use_bin_type=True)), name) == default


@pytest.mark.parametrize("path,bad,expect", [
    (("prompt_index",), "4", "prompt_index"),
    (("epoch",), True, "epoch"),  # bool is not an int
    (("epoch",), 1.0, "epoch"),
    (("group_id",), b"bytes", "group_id"),
    (("trajectories",), {"a": 1}, "trajectories"),
    (("trajectories", 0), [1, 2], "trajectories[0]"),
    (("trajectories", 0, "reward"), "1.0", "trajectories[0].reward"),
    *((("trajectories", 1, "reward"), bad, "trajectories[1].reward")
      for bad in (math.nan, math.inf, -math.inf)),  # not finite
    (("trajectories", 0, "metadata"), [1], "trajectories[0].metadata"),
    # list, not bytes
    (("trajectories", 0, "output_ids"), [10, 11, 12, 13, 14], "trajectories[0].output_ids"),
    (("trajectories", 1, "finish_reason"), None, "trajectories[1].finish_reason"),
    # a wrong dtype or a malformed array
    *((("trajectories", 0, name), bad, f"trajectories[0].{name}") for name, bad in [
        ("behav_logp", ["<f8", 5, np.zeros(5).tobytes()]),
        ("output_ids", ["<i8", 5, np.arange(5).tobytes()]),
        ("versions", [">i4", 5, np.arange(5, dtype=">i4").tobytes()]),
        ("output_ids", ["<i4", 5, b"\0" * 19]),  # bytes disagree with the length
        ("output_ids", ["<i4", -1, b""]),
        ("output_ids", ["<i4", 5]),
    ]),
    # an array whose length disagrees with output_ids'
    *((("trajectories", 0, name), wire_of(make_group(t=4))["trajectories"][0][name],
       f"trajectories[0].{name}") for name in ("behav_logp", "versions")),
])
def test_rejects_wrongly_typed_field(path, bad, expect):
    wire = wire_of(make_group())
    _set(*path, bad)(wire)
    assert reject(wire).field == expect


@pytest.mark.parametrize("reward", [np.float32(0.5), np.float64(0.5), np.int64(2), 2, 0.5],
                         ids=["np.float32", "np.float64", "np.int64", "int", "float"])
def test_trajectory_of_takes_any_finite_real_reward_as_a_float(reward):
    traj = make_traj(reward=reward)
    assert type(traj.reward) is float and traj.reward == float(reward)
    group = P.TrajectoryGroup(group_id="g", server_id="s", lease_id="l", prompt_index=0, epoch=0,
                              trajectories=[traj])
    assert P.decode(P.encode(group)).trajectories[0].reward == float(reward)


def test_a_group_submit_carries_the_group_frame_as_encoded_and_opens_it_checked():
    group_frame = P.encode_group(make_group())
    frame = P.encode(P.GroupSubmit(group=group_frame, want_credits=3))
    assert bytes(group_frame) in frame and frame.count(bytes(group_frame)) == 1
    submit = P.decode(frame)
    group, view = P.opened(submit)
    assert bytes(view) == bytes(group_frame) and view.readonly
    assert_same(group, make_group())
    wire = wire_of(make_group())
    wire["trajectories"][0]["reward"] = "x"
    bad = P.GroupSubmit(group=msgspec.Raw(msgpack.packb(wire, use_bin_type=True)))
    with pytest.raises(P.ProtocolError) as info:
        P.opened(P.decode(P.encode(bad)))
    assert info.value.field == "group.trajectories[0].reward"
    other = P.GroupSubmit(group=msgspec.Raw(P.encode(P.StatsRequest())))
    with pytest.raises(P.ProtocolError, match="expected a trajectory_group, got stats_request"):
        P.opened(P.decode(P.encode(other)))


def test_a_batch_of_stored_frames_decodes_as_a_batch_of_groups():
    groups = [make_group(), make_group(n=3, t=2)]
    spliced = P.encode(P.Batch(groups=[P.encode_group(g) for g in groups], trainer_version=2,
                               batch_id="b"))
    assert spliced == P.encode(P.Batch(groups=groups, trainer_version=2, batch_id="b"))
    assert_same(P.decode(spliced), P.Batch(groups=groups, trainer_version=2, batch_id="b"))


def test_frames_over_the_limit_are_refused(monkeypatch):
    small, big = make_group(), make_group(n=4, t=64)
    big_frame = P.encode(big)
    # room for exactly the small group's frame and its envelope: a full GroupSubmit fits
    monkeypatch.setattr(P, "MAX_FRAME_BYTES", len(P.encode(small)) + P.SUBMIT_ENVELOPE_BYTES)
    submit = P.GroupSubmit(group=P.encode_group(small), want_credits=P.MAX_CREDITS_PER_REQUEST)
    assert len(P.encode(submit)) <= P.MAX_FRAME_BYTES
    monkeypatch.setattr(P, "MAX_FRAME_BYTES", P.MAX_FRAME_BYTES - 1)  # one byte short
    for refuse in (lambda: P.encode_group(small), lambda: P.encode(big),
                   lambda: P.encode_into(big, bytearray()), lambda: P.decode(big_frame)):
        with pytest.raises(P.ProtocolError) as info:
            refuse()
        assert info.value.field == "frame"


@pytest.mark.parametrize("msg, path, bad", [
    (P.Register(server_id="s", engine_url="http://e"), ("engine_ranks",),
     [0, -1, P.MAX_GROUP_RANKS + 1]),
    (P.Heartbeat(server_id="s", policy_version=0), ("in_flight",), [-1]),
    (P.Credits(credits=[P.Credit(lease_id="L", prompt_index=0, epoch=0, deadline_s=1.0)],
               policy_version=0),
     ("credits", 0, "prompt_index"), [-1]),
    (make_group(), ("epoch",), [-1]),
    (make_group(), ("prompt_index",), [-3]),
    (P.BatchRequest(n_groups=1, trainer_version=0), ("n_groups",), [0, -2]),
    (P.GroupSubmit(group=P.encode_group(make_group())), ("want_credits",),
     [-1, P.MAX_CREDITS_PER_REQUEST + 1]),
    (P.CreditRequest(server_id="s", max_credits=3), ("max_credits",),
     [-1, P.MAX_CREDITS_PER_REQUEST + 1]),
    (P.Roster(members=[P.RosterEntry(server_id="s", engine_url="u", engine_ranks=1,
                                     policy_version=0)],
              policy_version=0), ("members", 0, "engine_ranks"), [0]),
    # every float field must be finite
    (P.BatchRequest(n_groups=1, trainer_version=0, wait_s=1.0), ("wait_s",),
     [math.nan, math.inf, -math.inf]),
    (P.Credits(credits=[P.Credit(lease_id="L", prompt_index=0, epoch=0, deadline_s=1.0)],
               policy_version=0), ("credits", 0, "deadline_s"), [math.nan, math.inf, -math.inf]),
], ids=lambda v: ".".join(map(str, v)) if isinstance(v, tuple) else None)
def test_numbers_have_ranges_on_decode(msg, path, bad):
    assert P.encode(P.decode(P.encode(msg))) == P.encode(msg)  # in range: taken
    for value in bad:
        wire = wire_of(msg)
        _set(*path, value)(wire)
        assert reject(wire).field.endswith(path[-1]), (path, value)


def test_rejects_non_frames():
    released = memoryview(P.encode(make_group()))
    released.release()  # was a ValueError from memoryview(), not a ProtocolError
    for bad in ("text", None, 12, [b"x"], released):
        with pytest.raises(P.ProtocolError) as info:
            P.decode(bad)  # type: ignore[arg-type]
        assert info.value.field == "frame"
    for bad in (b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({1: 2}),
                msgpack.packb({"a": 1}) + b"\x00"):
        with pytest.raises(P.ProtocolError):
            P.decode(bad)


# ---------------------------------------------------------------- fuzz

FUZZ_FRAMES = 12_000


def _valid_frames(rng: random.Random) -> list[bytes]:
    frames = [P.encode(make_group(n=rng.randint(1, 3), t=rng.randint(0, 12))) for _ in range(8)]
    frames += [P.encode(m) for m in (
        P.Register(server_id="r", engine_url="http://h:1"),
        P.Heartbeat(server_id="r", policy_version=3),
        P.Register(server_id="r", engine_url="http://h:1", sync_url="http://h:2"),
        P.HeartbeatAck(policy_version=2, known=True),
        P.Credits(credits=[P.Credit(lease_id="1", prompt_index=2, epoch=0, deadline_s=9.0)],
                  policy_version=1),
        P.Batch(groups=[make_group()], trainer_version=3), P.Stats(values={"a": 1.5}),
        P.Roster(members=[P.RosterEntry(server_id="r", engine_url="u", engine_ranks=1,
                                        policy_version=0)],
                 policy_version=0), P.RosterRequest())]
    return frames


def _random_value(rng: random.Random):
    return rng.choice([None, True, -1, 2**40, -(2**63), 2**64 - 1, 1.5, math.nan, math.inf, "",
                       "x" * rng.randint(0, 5), b"\x00\x01", [], [1, "a"], {}, {1: 2},
                       {"k": {b"b": [1]}}, {"type": "trajectory"},
                       msgpack.ExtType(5, b"x"), msgpack.Timestamp(1, 5), ["<i4", 1, b"\0\0\0\0"],
                       ["<f4", 2, b"\0"], ["<i4", True, b""], ("<i4", 0, b"")])


def _structural_mutation(rng: random.Random, frame: bytes) -> bytes:
    """Replace, delete or add one node somewhere in the decoded tree."""
    tree = msgpack.unpackb(frame, strict_map_key=False)
    nodes = [tree]
    stack = [tree]
    while stack:
        node = stack.pop()
        children = (list(node.values()) if isinstance(node, dict)
                    else node if isinstance(node, list) else [])
        for child in children:
            if isinstance(child, (dict, list)):
                nodes.append(child)
                stack.append(child)
    node = rng.choice(nodes)
    if isinstance(node, dict):
        keys = list(node)
        op = rng.randrange(3)
        if op == 0 and keys:
            node[rng.choice(keys)] = _random_value(rng)
        elif op == 1 and keys:
            del node[rng.choice(keys)]
        else:
            node[rng.choice(["type", "protocol", "extra", "reward"])] = _random_value(rng)
    elif node:
        node[rng.randrange(len(node))] = _random_value(rng)
    return msgpack.packb(tree, use_bin_type=True)


def _byte_mutation(rng: random.Random, frame: bytes, other: bytes) -> bytes:
    data = bytearray(frame)
    op = rng.randrange(5)
    if op == 0:  # bit flips
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        return bytes(data)
    if op == 1:  # truncation
        return bytes(data[:rng.randrange(len(data))])
    if op == 2:  # splice of two valid frames
        return bytes(data[:rng.randrange(len(data))]) + other[rng.randrange(len(other)):]
    if op == 3:  # random byte overwrite (often hits length prefixes)
        i = rng.randrange(len(data))
        data[i:i + 4] = rng.randbytes(4)
        return bytes(data)
    i = rng.randrange(len(data) + 1)  # insertion
    return bytes(data[:i]) + rng.randbytes(rng.randint(1, 6)) + bytes(data[i:])


def test_fuzz_only_protocol_error_escapes():
    rng = random.Random(1234)
    valid = _valid_frames(rng)
    outcomes = {"ok": 0, "rejected": 0}
    for i in range(FUZZ_FRAMES):
        kind = i % 4
        if kind == 0:
            frame = rng.randbytes(rng.randint(0, 64))
            if frame and rng.random() < 0.5:
                frame = bytes([0x80 | rng.randrange(16)]) + frame  # starts like a small map
        elif kind == 3:
            frame = _structural_mutation(rng, rng.choice(valid))
        else:
            frame = _byte_mutation(rng, rng.choice(valid), rng.choice(valid))
        try:
            msg = P.decode(frame)
        except P.ProtocolError as e:
            assert e.field, f"ProtocolError without a field for frame {frame[:40]!r}"
            outcomes["rejected"] += 1
        else:  # whatever is accepted is a valid message that re-encodes
            assert P.encode(P.decode(P.encode(msg))) == P.encode(msg)
            outcomes["ok"] += 1
    assert sum(outcomes.values()) == FUZZ_FRAMES >= 10_000
    assert outcomes["rejected"] > FUZZ_FRAMES // 2


def _nested_frame(depth: int, open_byte: bytes = b"\x91", key: bytes = b"\xa6values",
                  protocol: int = P.PROTOCOL_VERSION) -> bytes:
    """A hand-written stats frame with key's value nested depth deep (fixarray or fixmap)."""
    return (b"\x83\xa4type\xa5stats" + key + b"\x81\xa1a" + open_byte * depth + b"\x90"
            + b"\xa8protocol" + bytes([protocol]))


@pytest.mark.parametrize("open_byte", [b"\x91", b"\x81\xa1a"])
# 1: the refused-version path reads the frame again
@pytest.mark.parametrize("protocol", [P.PROTOCOL_VERSION, 1])
def test_deep_nesting_raises_only_protocol_error(protocol, open_byte):
    with pytest.raises(P.ProtocolError) as e:
        P.decode(_nested_frame(50_000, open_byte, protocol=protocol))
    assert e.value.field in ("frame", "protocol")
    assert isinstance(P.decode(_nested_frame(3)), P.Stats)  # shallow nesting is fine, nothing broke


def test_no_finalizer_runs_inside_a_deep_decode(monkeypatch):
    class Garbage:
        pass

    ran, unraisable = [], []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    frame = _nested_frame(50_000)
    old = gc.get_threshold()
    try:
        for due in range(800, 1001):  # allocations before the next collection
            gc.collect(0)
            g = Garbage()
            g.cycle = g  # freed only by a collection
            weakref.finalize(g, lambda: ran.append(sum(range(3))))
            del g
            gc.set_threshold(due, 10, 10)
            with pytest.raises(P.ProtocolError, match="nested too deeply"):
                P.decode(frame)
            gc.set_threshold(*old)
    finally:
        gc.set_threshold(*old)
    gc.collect()
    assert [u.exc_type for u in unraisable] == [] and len(ran) == 201


@pytest.mark.parametrize("field,value", [("server_id", "rollout-0\n[buffer] forged line"),
                                         ("server_id", "r" * 129),
                                         ("engine_url", "http://x\r\nforged"),
                                         ("sync_url", "http://" + "x" * 600)])
def test_a_peers_names_and_addresses_reach_no_log_line_with_a_newline(field, value):
    fields = {"server_id": "rollout-0", "engine_url": "http://127.0.0.1:1", "policy_version": 0}
    frame = P.encode(P.Register(**{**fields, field: value}))
    with pytest.raises(P.ProtocolError) as info:
        P.decode(frame)
    assert field in str(info.value)
