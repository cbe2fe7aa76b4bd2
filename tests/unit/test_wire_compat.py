"""Frames and a write-ahead log written by an earlier build: refused live, read back when stored.

The fixtures under ``tests/fixtures/`` were written once by ``tests/fixtures/make_wire_fixtures.py``
with the protocol as it stood before its rewrite, at protocol version 1 (and are never regenerated
in passing). Version 2 added ``Trajectory.loss_mask``, required, so:

* every stored frame, received live, is refused with an error naming the protocol version;
* the same frame with only what version 2 changed done by hand (the version number, and a loss
  mask of ones on every trajectory) decodes to the message recorded beside it, field by field,
  arrays by dtype and values, and encodes again to a frame that decodes to the same message: the
  layout of every message is otherwise unchanged;
* ``decode_stored`` (what a buffer reads its WAL with) reads a version-1 trajectory group as that
  message, and refuses every other version-1 frame (nothing else is stored);
* a real buffer daemon started on a copy of the stored WAL directory recovers it: the groups not
  consumed are stored with their content intact (every token generated), the consumed ones (and the
  stored ones) are known as duplicates, the version and the prompt cursor are where the old buffer
  left them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from areal_like import protocol as P
from areal_like.codec import field_names
from areal_like.config import BufferConfig, RunConfig, SecurityConfig, TaskConfig, to_yaml
from areal_like.dealer import Client

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
WIRE = FIXTURES / "wire_v1"
WAL = FIXTURES / "wal_v1"
EXPECTED = json.loads((WIRE / "expected.json").read_text())
TIMEOUT_S = 60.0


def plain(value):
    """Same conversion as the fixture writer's (kept here so the test does not import it)."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return {"$array": value.dtype.str, "values": value.tolist()}
    if isinstance(value, bytes):
        return {"$bytes": value.hex()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return {"type": value.TYPE, **{name: plain(getattr(value, name)) for name in field_names(type(value))}}


# Fields added with a default after the fixtures were written: an old frame decodes with the default.
ADDED_SINCE = {"weight_sync_plan": {"path": "distributed", "payloads": []}, "register": {"fresh": False, "evaluates": False},
               "roster_entry": {"evaluates": False}, "sync_done": {"want_credits": 0}}


def with_masks(value):
    """``value`` (plain) with the loss mask version 2 reads a version-1 trajectory with: all ones."""
    if isinstance(value, list):
        return [with_masks(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: with_masks(v) for k, v in value.items()}
    if value.get("type") == "trajectory":
        out["loss_mask"] = {"$array": "<i4", "values": [1] * len(value["output_ids"]["values"])}
    return out


def as_version_2(frame: bytes) -> bytes:
    """What version 2 changed, done by hand on the raw msgpack: the number, and a mask of ones."""
    import msgspec

    wire = msgspec.msgpack.decode(frame)
    assert wire["protocol"] == 1
    wire["protocol"] = 2
    for group in [wire] if wire["type"] == "trajectory_group" else wire.get("groups", []):
        for t in group["trajectories"]:
            t["loss_mask"] = ["<i4", t["output_ids"][1], b"\x01\x00\x00\x00" * t["output_ids"][1]]
    return msgspec.msgpack.encode(wire)


def assert_plain_equal(got, want, path: str = "") -> None:
    """Equal values of equal types (True is not 1, 1 is not 1.0)."""
    assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, dict):
        want = {**ADDED_SINCE.get(want.get("type"), {}), **want}
        assert set(got) == set(want), f"{path}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_plain_equal(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), f"{path}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_plain_equal(g, w, f"{path}[{i}]")
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def test_every_message_type_is_in_the_fixtures():
    top = {"register", "register_ack", "heartbeat", "heartbeat_ack", "credit_request", "credits",
           "trajectory_group", "ack", "batch_request", "batch", "version_update", "roster_request", "roster",
           "weight_sync_plan", "sync_done", "sync_status_request", "sync_status", "stats_request", "stats"}
    assert {m["type"] for m in EXPECTED.values()} == top
    nested = json.dumps(EXPECTED)
    for tag in ("trajectory", "credit", "roster_entry", "sync_member", "bucket_spec"):
        assert f'"type": "{tag}"' in nested


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_old_frames_are_refused_live_and_keep_their_layout(name):
    frame = (WIRE / f"{name}.msgpack").read_bytes()
    with pytest.raises(P.ProtocolError, match=r"unsupported protocol version 1 \(this side speaks 2\)") as info:
        P.decode(frame)
    assert info.value.field == "protocol"
    want = with_masks(EXPECTED[name])
    msg = P.decode(as_version_2(frame))
    assert_plain_equal(plain(msg), want)
    assert_plain_equal(plain(P.decode(P.encode(msg))), want)  # and this code writes them the same


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_stored_version_1_group_reads_as_all_generated(name):
    frame = (WIRE / f"{name}.msgpack").read_bytes()
    if EXPECTED[name]["type"] != "trajectory_group":  # only groups are stored
        with pytest.raises(P.ProtocolError, match="unsupported protocol version 1"):
            P.decode_stored(frame)
        return
    assert_plain_equal(plain(P.decode_stored(frame)), with_masks(EXPECTED[name]))


def _start_buffer(run_dir: Path, spawn_python, free_port) -> tuple[RunConfig, object]:
    shutil.copytree(WAL / "wal", run_dir / "wal")
    cfg = RunConfig(run_dir=str(run_dir), task=TaskConfig(num_prompts=1000),
                    security=SecurityConfig(curve=False), buffer=BufferConfig(  # the WAL is the subject here
        address=f"tcp://127.0.0.1:{free_port()}", pub_address=f"tcp://127.0.0.1:{free_port()}",
        max_staleness=10, groups_per_step=2, capacity=64, lease_timeout_s=3600.0))
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return cfg, spawn_python("buffer", ["--config-file", run_dir / "config.yaml"], capture=False)


def test_a_buffer_recovers_an_old_write_ahead_log(tmp_run_dir, spawn_python, free_port):
    want = json.loads((WAL / "expected.json").read_text())
    cfg, _ = _start_buffer(tmp_run_dir, spawn_python, free_port)
    client = Client(cfg.buffer.address, timeout_s=TIMEOUT_S)
    try:
        stats = client.request(P.StatsRequest()).values
        assert stats["policy_version"] == want["policy_version"]
        assert stats["stored"] == len(want["stored"])
        assert (stats["cursor_index"], stats["cursor_epoch"]) == (want["cursor_index"], want["cursor_epoch"])
        assert stats["in_flight"] == len(want["leased"]) and stats["wal_corrupt_records"] == 0
        batch = client.request(P.BatchRequest(n_groups=len(want["stored"]), trainer_version=want["policy_version"],
                                              wait_s=5.0))
        got = sorted((plain(g) for g in batch.groups), key=lambda g: g["group_id"])
        assert_plain_equal(got, sorted(with_masks(want["stored"]), key=lambda g: g["group_id"]))
        # every group the old buffer accepted (stored or consumed) is still known: re-sent, it is a duplicate
        client.request(P.Register(server_id="s0", engine_url="http://x", policy_version=1))
        for g in batch.groups[:1]:
            assert client.request(g).status == "duplicate"
        for gid in want["consumed"]:
            again = P.TrajectoryGroup(group_id=gid, server_id="s0", lease_id="x", prompt_index=0, epoch=0,
                                      trajectories=batch.groups[0].trajectories)
            assert client.request(again).status == "duplicate", gid
        # the cursor goes on where it stopped: the next lease is a prompt never handed out
        credits = client.request(P.CreditRequest(server_id="s0", max_credits=1)).credits
        assert [c.prompt_index for c in credits] == [want["cursor_index"]]
    finally:
        client.close()
