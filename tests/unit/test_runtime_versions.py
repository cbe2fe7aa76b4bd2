"""One torch everywhere: engines report torch/CUDA/NCCL in Register, the buffer keeps them in the
roster, and the trainer leaves out a member whose versions cannot share the weight group."""

from __future__ import annotations

import asyncio
import logging

import msgpack
import pytest
import torch
from service_harness import start, step  # the buffer service with fake sockets
from test_weight_members import ScriptedBuffer

from areal_like.net.metrics import Metrics
from areal_like.settings.config import BufferConfig, WeightSyncConfig
from areal_like.weights.versions import (
    RuntimeVersions,
    engine_versions,
    from_server_info,
    local_versions,
    mismatch,
)
from areal_like.wire import protocol as P
from areal_like.wire.codec import field_names
from trainer.weight_sync import SyncReport, WeightBroadcaster

GPU = RuntimeVersions("2.14.1+cu130", "13.0", "2.30.7")
VERSIONS = {"torch_version": "2.14.1+cu130", "cuda_version": "13.0", "nccl_version": "2.30.7"}


# ---------------------------------------------------------------- the rule

@pytest.mark.parametrize("peer,backend,refused_for", [
    (GPU, "nccl", None),  # same versions
    (RuntimeVersions("2.14.1+cu128", "12.8", "2.30.7"), "nccl", ["CUDA 13.0 here, 12.8 there"]),
    (RuntimeVersions("2.14.1+cu130", "13.0", "2.27.3"), "nccl", ["NCCL 2.30.7 here, 2.27.3 there"]),
    (RuntimeVersions("2.13.0+cu130", "13.0", "2.30.7"), "nccl",
     ["torch 2.14.1 here, 2.13.0 there"]),
    (RuntimeVersions("2.13.0+cu128", "12.8", "2.27.3"), "nccl",
     ["torch 2.14.1 here, 2.13.0 there", "CUDA 13.0 here, 12.8 there",
      "NCCL 2.30.7 here, 2.27.3 there"]),
    # build tag only: the CUDA version decides
    (RuntimeVersions("2.14.1", "13.0", "2.30.7"), "nccl", None),
    (RuntimeVersions(), "nccl", None),  # unknown (an older server): accepted
    # NCCL unknown there: the rest agrees
    (RuntimeVersions("2.14.1+cu130", "13.0", ""), "nccl", None),
    (RuntimeVersions("2.13.0+cu130", "", ""), "nccl", ["torch 2.14.1 here, 2.13.0 there"]),
    (RuntimeVersions("2.14.0", "", ""), "gloo", None),  # gloo: a patch release may meet
    # gloo: CUDA/NCCL play no part
    (RuntimeVersions("2.14.1+cu128", "12.8", "2.27.3"), "gloo", None),
    (RuntimeVersions("2.13.0", "", ""), "gloo", ["torch major.minor 2.14 here, 2.13 there"]),
    (RuntimeVersions(), "gloo", None),
])
def test_mismatch_table(peer, backend, refused_for):
    why = mismatch(GPU, peer, backend)
    if refused_for is None:
        assert why is None
        return
    assert why.startswith(f"{backend} group refused: ")
    for part in refused_for:
        assert part in why
    assert str(GPU) in why and str(peer) in why  # both sides named in full


def test_local_versions_are_this_process_torch_and_the_server_reports_the_engines():
    with pytest.raises(ValueError, match="'mpi'"):  # an unknown backend: no rule to apply
        mismatch(GPU, GPU, "mpi")
    v = local_versions()
    assert v.torch == torch.__version__ and v.cuda == (torch.version.cuda or "")
    assert (v.nccl != "") == torch.cuda.is_available()
    # torch.__version__ is a str subclass the codec refuses
    assert v.known() and type(v.torch) is str
    reg = P.decode(P.encode(P.Register(server_id="r", engine_url="u", torch_version=v.torch,
                                       cuda_version=v.cuda, nccl_version=v.nccl)))
    assert (reg.torch_version, reg.cuda_version, reg.nccl_version) == (v.torch, v.cuda, v.nccl)
    # the rollout server reports the engine's; SGLang says nothing
    assert from_server_info({"version": "0.5.23", "tp_size": 2}) == RuntimeVersions()
    assert from_server_info({**VERSIONS, "tp_size": 1}) == GPU
    assert (from_server_info({"torch_version": "2.14.1", "cuda_version": None})
            == RuntimeVersions("2.14.1"))
    assert asyncio.run(engine_versions("embedded", {})) == v
    assert asyncio.run(engine_versions("url", {**VERSIONS})) == GPU  # what the engine says wins
    assert asyncio.run(engine_versions("url", {"version": "0.5.23"})) == v  # else assumed: ours
    assert asyncio.run(engine_versions("sglang", {"version": "0.5.23"})) == v


# ---------------------------------------------------------------- the wire

def _without(msg: P.Message, *names: str) -> bytes:
    """``msg``'s frame as a sender built before ``names`` existed writes it."""
    wire = msgpack.unpackb(P.encode(msg), raw=False)
    for name in names:
        del wire[name]
    return msgpack.packb(wire, use_bin_type=True)


FIELDS = ("torch_version", "cuda_version", "nccl_version")


def _values(msg: P.Message) -> dict:
    return {name: getattr(msg, name) for name in field_names(type(msg))}


def test_register_and_roster_entry_round_trip_with_and_without_versions_as_strings():
    reg = P.Register(server_id="r", engine_url="http://h:1", engine_ranks=2, policy_version=3,
                     **VERSIONS)
    assert _values(P.decode(P.encode(reg))) == _values(reg)
    old = _without(reg, *FIELDS)
    got = P.decode(old)
    assert (got.server_id, got.engine_ranks, got.policy_version) == ("r", 2, 3)
    assert (got.torch_version, got.cuda_version, got.nccl_version) == ("", "", "")
    entry = P.RosterEntry(server_id="r", engine_url="u", engine_ranks=1, policy_version=0,
                          **VERSIONS)
    roster = P.Roster(members=[entry], policy_version=0)
    assert _values(P.decode(P.encode(roster)).members[0]) == _values(entry)
    wire = msgpack.unpackb(P.encode(roster), raw=False)
    for name in FIELDS:
        del wire["members"][0][name]
    old_entry = P.decode(msgpack.packb(wire, use_bin_type=True)).members[0]
    assert _values(old_entry) == _values(P.RosterEntry(server_id="r", engine_url="u",
                                                       engine_ranks=1, policy_version=0))
    assert old_entry.torch_version == old_entry.cuda_version == old_entry.nccl_version == ""
    wire = msgpack.unpackb(P.encode(reg), raw=False)
    wire["nccl_version"] = 23007  # a version must be a string
    with pytest.raises(P.ProtocolError) as info:
        P.decode(msgpack.packb(wire, use_bin_type=True))
    assert info.value.field == "nccl_version"


# ---------------------------------------------------------------- the buffer

def test_the_buffer_keeps_the_versions_from_register_in_the_roster(tmp_path):
    svc = start(tmp_path, BufferConfig(max_staleness=1, groups_per_step=2))
    try:
        step(svc, P.Register(server_id="new", engine_url="http://n", engine_ranks=2,
                             policy_version=0, evaluates=True, **VERSIONS))
        # an older server's frame
        old = _without(P.Register(server_id="old", engine_url="http://o"), *FIELDS)
        svc.handle(b"peer", b"req", P.decode(old), old)
        members = {m.server_id: m for m in step(svc, P.RosterRequest()).members}
        # what the Register said, every other field its default
        assert _values(members["new"]) == _values(P.RosterEntry(
            server_id="new", engine_url="http://n", engine_ranks=2, policy_version=0,
            evaluates=True, **VERSIONS))
        assert (members["old"].torch_version, members["old"].cuda_version,
                members["old"].nccl_version) == ("",) * 3
        step(svc, P.Heartbeat(server_id="new", policy_version=4))  # a version change keeps them
        members = {m.server_id: m for m in step(svc, P.RosterRequest()).members}
        assert members["new"].policy_version == 4 and members["new"].nccl_version == "2.30.7"
    finally:
        svc.stop()


# ---------------------------------------------------------------- the trainer

def _entry(sid: str, v: RuntimeVersions) -> P.RosterEntry:
    return P.RosterEntry(server_id=sid, engine_url="", engine_ranks=2 if sid == "b" else 1,
                         policy_version=0, torch_version=v.torch, cuda_version=v.cuda,
                         nccl_version=v.nccl)


@pytest.fixture
def broadcaster():
    metrics = Metrics()
    b = WeightBroadcaster(WeightSyncConfig(backend="nccl"), buffer_address="tcp://127.0.0.1:1",
                          rank=0, device=torch.device("cpu"), metrics=metrics)
    b.client.close()
    b.versions = GPU  # as on a GPU node: the rule, not this machine's torch, is under test
    yield b, metrics
    b.close()


def _refused_count(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("areal_trainer_weight_sync_refused_total") or 0.0


def test_the_trainer_leaves_out_members_whose_versions_differ(broadcaster, caplog):
    b, metrics = broadcaster
    other_nccl = RuntimeVersions("2.14.1+cu130", "13.0", "2.27.3")
    entries = [_entry("a", GPU), _entry("b", other_nccl), _entry("c", RuntimeVersions())]
    with caplog.at_level(logging.WARNING, logger="trainer.weight_sync"):
        report = SyncReport(version=5)
        assert b._admit(entries, report) == [("a", 1, ""), ("c", 1, "")]
        assert report.refused == ["b"] and _refused_count(metrics) == 1
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert (len(errors) == 1 and "server b" in errors[0]
                and "NCCL 2.30.7 here, 2.27.3 there" in errors[0])
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "server c reports no torch/CUDA/NCCL versions" in warnings[0]
        # refused again (counted), the old peer warned about once
        b._admit(entries, SyncReport(version=6))
    assert _refused_count(metrics) == 2
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1


def test_a_plan_with_every_member_refused_is_not_sent(broadcaster):
    b, metrics = broadcaster
    b.client = ScriptedBuffer(P.Roster(members=[_entry("a", RuntimeVersions("2.13.0", "12.8",
                                                                             "2.27.3"))],
                                        policy_version=4))
    report = SyncReport(version=5)
    assert b._setup([], report, float("inf"), None, set()) is False
    assert report.members == [] and report.refused == ["a"] and _refused_count(metrics) == 1
    assert [type(m) for m in b.client.sent] == [P.RosterRequest] and b.sender.group.pg is None


def test_catch_up_does_not_wait_for_a_refused_member(broadcaster):
    import time

    b, _ = broadcaster
    b._admit([_entry("a", GPU), _entry("b", RuntimeVersions("2.13.0", "12.8", "2.27.3"))],
             SyncReport(version=9))
    b.client = ScriptedBuffer(P.Roster(members=[P.RosterEntry(server_id="a", engine_url="",
                                                                engine_ranks=1,
                                                                policy_version=10),
                                                 P.RosterEntry(server_id="b", engine_url="",
                                                               engine_ranks=1,
                                                               policy_version=3)],
                                        policy_version=10))
    b.loaded = {"a": 10}  # a loaded the final version from this trainer
    assert b.catch_up_decision(10, time.monotonic() + 60, 0) == "done"
