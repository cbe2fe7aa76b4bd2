"""WAL damage found at a real buffer daemon's restart (buffer/wal.py, recovery.py): damaged
records after a kill -9 are counted, the rest handed out once, a damaged group's prompt generated
again."""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).parent))
from test_buffer_crash import PLAIN, group_for  # noqa: E402

from areal_like.net.dealer import Client  # noqa: E402
from areal_like.net.distributed import free_port  # noqa: E402
from areal_like.net.metrics import scrape  # noqa: E402
from areal_like.net.peers import TRAINER_PEER  # noqa: E402
from areal_like.settings.config import (  # noqa: E402
    BufferConfig,
    ModelConfig,
    RunConfig,
    TaskConfig,
    to_yaml,
)
from areal_like.wire import protocol as P  # noqa: E402
from buffer.wal import HEADER  # noqa: E402

TIMEOUT_S = 60.0
N_GROUPS = 8


def _client(address: str, identity: str | None = None) -> Client:
    return Client(address, timeout_s=TIMEOUT_S, **({"identity": identity} if identity else {}))


def _records(path: Path) -> list[tuple[int, str, bytes]]:
    """(offset, kind, payload) of every record of an intact segment file."""
    data, pos, out = path.read_bytes(), 0, []
    while pos < len(data):
        length = HEADER.unpack_from(data, pos)[0]
        start = pos + HEADER.size
        out.append((pos, chr(data[start]), data[start + 1:start + length]))
        pos += HEADER.size + length
    return out


def _register(server: Client) -> None:
    server.request(P.Register(server_id="s0", engine_url="http://127.0.0.1:1", policy_version=0))


def _batch(trainer: Client, n: int, ack: str = "", wait_s: float = 5.0) -> P.Batch:
    request = P.BatchRequest(n_groups=n, trainer_version=0, wait_s=wait_s, ack_batch=ack)
    return trainer.request(request)


def _fill(cfg: RunConfig) -> tuple[list[P.TrajectoryGroup], list[list[str]]]:
    """8 groups accepted; two batches of 2 consumed. Returns the groups and the consumed batches."""
    server, trainer = _client(cfg.buffer.address, "s0"), _client(cfg.buffer.address, TRAINER_PEER)
    try:
        _register(server)
        credits = server.request(P.CreditRequest(server_id="s0", max_credits=N_GROUPS)).credits
        groups = [group_for(c, "s0") for c in credits]
        assert [server.request(g).status for g in groups] == ["accepted"] * N_GROUPS
        consumed, ack = [], ""
        for _ in range(2):
            batch = _batch(trainer, 2, ack)
            assert len(batch.groups) == 2, batch.reason
            consumed.append([g.group_id for g in batch.groups])
            ack = batch.batch_id
        assert not _batch(trainer, 100, ack, wait_s=0.2).groups  # acks the second: both consumed
        assert trainer.request(P.StatsRequest()).values["groups_consumed"] == 4
    finally:
        server.close()
        trainer.close()
    return groups, consumed


def _damage(segment: Path, flipped: str, zeroed: str, consumed_first: list[str]) -> None:
    """Flips a byte mid-frame of group ``flipped``, zeroes the header of group ``zeroed``, flips a
    byte of the control record holding the first batch's consumed marks, and appends a torn
    header (a crash mid-append left 5 bytes of it at the end)."""
    data = bytearray(segment.read_bytes())
    records = _records(segment)
    groups = {p[2:2 + int.from_bytes(p[:2], "little")].decode(): (off, len(p))
              for off, k, p in records if k == "G"}
    off, length = groups[flipped]
    data[off + HEADER.size + length // 2] ^= 0x20
    data[groups[zeroed][0]:groups[zeroed][0] + HEADER.size] = bytes(HEADER.size)
    off, _, payload = next(r for r in records if r[1] == "C"
                           and msgspec.msgpack.decode(r[2]).get("consumed") == consumed_first)
    data[off + HEADER.size + 1 + len(payload) // 2] ^= 0x20
    segment.write_bytes(bytes(data + HEADER.pack(1000, 0)[:5]))


def test_wal_damage_is_reported_and_bounded_on_restart(tmp_run_dir, spawn_python):
    cfg = RunConfig(run_dir=str(tmp_run_dir), security=PLAIN, task=TaskConfig(num_prompts=1000),
                    model=ModelConfig(vocab_size=1024), buffer=BufferConfig(
        address=f"tcp://127.0.0.1:{free_port()}", pub_address=f"tcp://127.0.0.1:{free_port()}",
        metrics_port=free_port(), max_staleness=100, groups_per_step=2, capacity=100,
        lease_timeout_s=600.0))
    config_file = tmp_run_dir / "config.yaml"
    config_file.write_text(to_yaml(cfg))
    buffer = spawn_python("buffer", ["--config-file", config_file], capture=False)
    groups, consumed = _fill(cfg)
    spawn_python.kill9(buffer)
    segments = sorted(Path(cfg.resolve_path(cfg.buffer.wal_dir)).glob("seg-*.wal"))
    assert len(segments) == 1
    victims = groups[4], groups[6]  # never consumed: the first two batches took groups[:4]
    _damage(segments[0], victims[0].group_id, victims[1].group_id, consumed[0])

    spawn_python("buffer", ["--config-file", config_file], capture=False)
    trainer, server = _client(cfg.buffer.address, TRAINER_PEER), _client(cfg.buffer.address, "s0")
    try:
        stats = trainer.request(P.StatsRequest()).values
        # the damaged control record is restored from the copy the next one carries, but counted
        assert stats["wal_corrupt_records"] == 4, stats
        page = scrape(f"http://127.0.0.1:{cfg.buffer.metrics_port}/metrics")
        assert page["areal_buffer_wal_corrupt_records"] == 4
        batch = _batch(trainer, stats["stored"])
        delivered = [g.group_id for g in batch.groups]
        used = {gid for b in consumed for gid in b}
        want = [g.group_id for g in groups if g.group_id not in used and g not in victims]
        # each once, and nothing consumed comes back
        assert sorted(delivered) == sorted(want), (delivered, want)
        _register(server)
        credits = server.request(P.CreditRequest(server_id="s0", max_credits=3)).credits
        # the damaged groups' prompts are generated again, first; then the cursor goes on
        assert stats["reissue_queue"] == 2, stats
        assert ([c.prompt_index for c in credits]
                == [victims[0].prompt_index, victims[1].prompt_index, N_GROUPS]), credits
    finally:
        trainer.close()
        server.close()
