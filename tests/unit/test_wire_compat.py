"""Frames and write-ahead logs written by earlier builds: refused live, read back when stored.

The fixtures under ``tests/fixtures/`` were written once each by ``tests/fixtures/make_wire_fixtures.py``
and are never regenerated in passing: ``wire_v1``/``wal_v1`` by the protocol as it stood before its
rewrite, at protocol version 1, ``wire_v2``/``wal_v2`` at version 2. Version 2 added
``Trajectory.loss_mask``, required; version 3 sends per-token versions and loss masks as runs. So,
for the fixtures of both versions:

* every stored frame, received live, is refused with an error naming the protocol version;
* the same frame with only what changed since done by hand (the version number, a loss mask of
  ones on every version-1 trajectory, versions and masks made into runs) decodes to the message
  recorded beside it, field by field, arrays by dtype and values, and encodes again to a frame that
  decodes to the same message: the layout of every message is otherwise unchanged;
* ``decode_stored`` (what a buffer reads its WAL with) reads a stored trajectory group as that
  message, and refuses every other old frame (nothing else is stored);
* a real buffer daemon started on a copy of the stored WAL directory recovers it: the groups not
  consumed are stored with their content intact (loss masks as written, all ones at version 1), the
  consumed ones (and the stored ones) are known as duplicates, the version and the prompt cursor are
  where the old buffer left them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import msgspec
import numpy as np
import pytest

from areal_like import protocol as P
from areal_like.codec import field_names
from areal_like.config import BufferConfig, RunConfig, SecurityConfig, TaskConfig, to_yaml
from areal_like.dealer import Client

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
VERSIONS = (1, 2)
EXPECTED = {v: json.loads((FIXTURES / f"wire_v{v}" / "expected.json").read_text()) for v in VERSIONS}
CASES = [(v, name) for v in VERSIONS for name in sorted(EXPECTED[v])]
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


def with_masks(value, version: int):
    """``value`` (plain) as version 3 reads it: a version-1 trajectory with a loss mask of ones."""
    if version != 1 or isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, list):
        return [with_masks(v, version) for v in value]
    out = {k: with_masks(v, version) for k, v in value.items()}
    if value.get("type") == "trajectory":
        out["loss_mask"] = {"$array": "<i4", "values": [1] * len(value["output_ids"]["values"])}
    return out


def runs_by_hand(full: list) -> list:
    """``["<i4", n, bytes]`` as version 3's ``["runs<i4", n, (value, end) pairs]``, by a plain loop."""
    values = list(np.frombuffer(full[2], "<i4"))
    pairs = []
    for i, v in enumerate(values):
        if i + 1 == len(values) or values[i + 1] != v:
            pairs += [int(v), i + 1]
    return ["runs<i4", full[1], np.asarray(pairs, "<i4").tobytes()]


def as_current(frame: bytes, version: int) -> bytes:
    """What changed since ``version``, done by hand on the raw msgpack: the number, a mask of ones
    (version 1), versions and masks as runs."""
    wire = msgspec.msgpack.decode(frame)
    assert wire["protocol"] == version

    def renumber(value):  # every message carries it, nested ones too (a Batch's groups, a plan)
        if isinstance(value, dict):
            if value.get("protocol") == version:
                value["protocol"] = P.PROTOCOL_VERSION
            for v in value.values():
                renumber(v)
        elif isinstance(value, list):
            for v in value:
                renumber(v)

    renumber(wire)
    for group in [wire] if wire["type"] == "trajectory_group" else wire.get("groups", []):
        for t in group["trajectories"]:
            if version == 1:
                t["loss_mask"] = ["<i4", t["output_ids"][1], b"\x01\x00\x00\x00" * t["output_ids"][1]]
            t["versions"], t["loss_mask"] = runs_by_hand(t["versions"]), runs_by_hand(t["loss_mask"])
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


@pytest.mark.parametrize("version", VERSIONS)
def test_every_message_type_is_in_the_fixtures(version):
    top = {"register", "register_ack", "heartbeat", "heartbeat_ack", "credit_request", "credits",
           "trajectory_group", "ack", "batch_request", "batch", "version_update", "roster_request", "roster",
           "weight_sync_plan", "sync_done", "sync_status_request", "sync_status", "stats_request", "stats"}
    assert {m["type"] for m in EXPECTED[version].values()} == top
    nested = json.dumps(EXPECTED[version])
    for tag in ("trajectory", "credit", "roster_entry", "sync_member", "bucket_spec"):
        assert f'"type": "{tag}"' in nested
    if version == 2:  # the masks to carry over have context spans
        assert '"values": [1, 1, 0, 0, 1' in nested


@pytest.mark.parametrize(("version", "name"), CASES)
def test_old_frames_are_refused_live_and_keep_their_layout(version, name):
    frame = (FIXTURES / f"wire_v{version}" / f"{name}.msgpack").read_bytes()
    with pytest.raises(P.ProtocolError,
                       match=rf"unsupported protocol version {version} \(this side speaks {P.PROTOCOL_VERSION}\)") as info:
        P.decode(frame)
    assert info.value.field == "protocol"
    want = with_masks(EXPECTED[version][name], version)
    msg = P.decode(as_current(frame, version))
    assert_plain_equal(plain(msg), want)
    assert_plain_equal(plain(P.decode(P.encode(msg))), want)  # and this code writes them the same


@pytest.mark.parametrize(("version", "name"), CASES)
def test_a_stored_group_reads_as_it_was_meant(version, name):
    frame = (FIXTURES / f"wire_v{version}" / f"{name}.msgpack").read_bytes()
    if EXPECTED[version][name]["type"] != "trajectory_group":  # only groups are stored
        with pytest.raises(P.ProtocolError, match=f"unsupported protocol version {version}"):
            P.decode_stored(frame)
        return
    assert_plain_equal(plain(P.decode_stored(frame)), with_masks(EXPECTED[version][name], version))


def _start_buffer(run_dir: Path, spawn_python, free_port, version: int) -> tuple[RunConfig, object]:
    shutil.copytree(FIXTURES / f"wal_v{version}" / "wal", run_dir / "wal")
    cfg = RunConfig(run_dir=str(run_dir), task=TaskConfig(num_prompts=1000),
                    security=SecurityConfig(curve=False), buffer=BufferConfig(  # the WAL is the subject here
        address=f"tcp://127.0.0.1:{free_port()}", pub_address=f"tcp://127.0.0.1:{free_port()}",
        max_staleness=10, groups_per_step=2, capacity=64, lease_timeout_s=3600.0))
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return cfg, spawn_python("buffer", ["--config-file", run_dir / "config.yaml"], capture=False)


@pytest.mark.parametrize("version", VERSIONS)
def test_a_buffer_recovers_an_old_write_ahead_log(tmp_run_dir, spawn_python, free_port, version):
    want = json.loads((FIXTURES / f"wal_v{version}" / "expected.json").read_text())
    cfg, _ = _start_buffer(tmp_run_dir, spawn_python, free_port, version)
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
        assert_plain_equal(got, sorted(with_masks(want["stored"], version), key=lambda g: g["group_id"]))
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
