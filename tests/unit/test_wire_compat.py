"""Frames and WALs of an earlier build are refused naming both versions (never regenerated
fixtures: tests/fixtures/wire_v2, wal_v2, wal_v3). Live frames: refused before any field. A buffer
on such a WAL: one line, exit 2, the WAL untouched (mutation: dropping the group started it).
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
