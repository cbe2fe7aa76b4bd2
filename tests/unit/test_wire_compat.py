"""Frames and write-ahead logs of an earlier build are refused, each naming the version it has and
the one this build reads (areal_like/wire/protocol.py, "Compatibility"; buffer/recovery.py).

The fixtures were written once by the build of their protocol version and are never regenerated:
``tests/fixtures/wire_v2`` holds one frame of every message type, ``tests/fixtures/wal_v2`` a
buffer's WAL with stored, consumed and leased groups, ``tests/fixtures/wal_v3`` one with stored and
consumed groups, each sent asking for a lease (``want_credits``, a field of the group until version
4). So:

* every one of those frames, received live, is refused with an error naming protocol version 2 and
  this side's version (and nothing else about it: the version is read before any field);
* a real buffer daemon started on a copy of that WAL does not start: one line naming the group,
  both versions and what to do, exit status 2 (as for a bad configuration), and the WAL directory
  is left as it was.

Mutation checked: recovery dropping such a group as unreadable (as it did for other decode errors)
made the buffer start and the daemon test fail.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from areal_like.settings.config import BufferConfig, RunConfig, SecurityConfig, TaskConfig, to_yaml
from areal_like.wire import protocol as P

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
EXPECTED = json.loads((FIXTURES / "wire_v2" / "expected.json").read_text())
EXIT_TIMEOUT_S = 60.0


def test_every_message_type_is_in_the_fixtures():
    top = {"register", "register_ack", "heartbeat", "heartbeat_ack", "credit_request", "credits",
           "trajectory_group", "ack", "batch_request", "batch", "version_update", "roster_request",
           "roster", "weight_sync_plan", "sync_done", "sync_status_request", "sync_status",
           "stats_request", "stats"}
    assert {m["type"] for m in EXPECTED.values()} == top


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_frame_of_version_2_is_refused_naming_both_versions(name):
    frame = (FIXTURES / "wire_v2" / f"{name}.msgpack").read_bytes()
    want = rf"unsupported protocol version 2 \(this side speaks {P.PROTOCOL_VERSION}\)"
    with pytest.raises(P.ProtocolError, match=want) as info:
        P.decode(frame)
    assert info.value.field == "protocol"


@pytest.mark.parametrize("version", [2, 3])
def test_a_buffer_refuses_to_start_on_a_wal_of_an_earlier_version(version, tmp_run_dir,
                                                                  spawn_python, free_port):
    shutil.copytree(FIXTURES / f"wal_v{version}" / "wal", tmp_run_dir / "wal")
    before = {p.name: p.read_bytes() for p in (tmp_run_dir / "wal").iterdir()}
    cfg = RunConfig(run_dir=str(tmp_run_dir), task=TaskConfig(num_prompts=1000),
                    security=SecurityConfig(curve=False), buffer=BufferConfig(
                        address=f"tcp://127.0.0.1:{free_port()}",
                        pub_address=f"tcp://127.0.0.1:{free_port()}"))
    (tmp_run_dir / "config.yaml").write_text(to_yaml(cfg))
    proc = spawn_python("buffer", ["--config-file", tmp_run_dir / "config.yaml"])
    _, err = proc.communicate(timeout=EXIT_TIMEOUT_S)
    assert proc.returncode == 2, err[-2000:]
    said = [line for line in err.splitlines() if "the WAL holds group" in line]
    assert len(said) == 1 and "Traceback" not in err, err[-2000:]
    assert (f"unsupported protocol version {version} (this side speaks {P.PROTOCOL_VERSION})"
            in said[0])
    assert "finish this run with the build that wrote it" in said[0]
    after = {p.name: p.read_bytes() for p in (tmp_run_dir / "wal").iterdir() if p.name != "LOCK"}
    assert after == {k: v for k, v in before.items() if k != "LOCK"}
