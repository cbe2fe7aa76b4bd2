"""What a member's fake engine (huge answers, forged log lines) can make trainer rank 0 read and
log: bounded memory, counted refusals, one quoted line per failure."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import logging
import threading
import time

import psutil
import pytest

from areal_like.engines.client import EngineError
from areal_like.engines.sglang import SGLangClient
from areal_like.net.metrics import Metrics, parse_exposition
from areal_like.weights.plan import SyncMember, WeightSyncPlan
from areal_like.wire.protocol import RosterEntry
from trainer.engine_drive import EngineDrive

HUGE = 1 << 30  # a /health answer
GENERATE = 64 << 20  # a /generate answer
CHUNK = b"x" * (1 << 20)
SYNCS = 10
MAX_GROWTH = 64 << 20
FORGED = "2026-01-01 00:00:00 ERROR trainer: FORGED"
SID = "m\n" + FORGED  # a member's id: what it registered
ERROR = "refused\n" + "\n".join([FORGED] * 4) + "\n" + "y" * (32 << 10)


class FakeEngine(http.server.BaseHTTPRequestHandler):
    """A member's engine and sync port: answers of any size, no Content-Length."""

    protocol_version = "HTTP/1.0"

    def log_message(self, *args) -> None:
        pass

    def _stream(self, total: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        try:
            for _ in range(total // len(CHUNK)):
                self.wfile.write(CHUNK)
        except OSError:  # the client stopped reading: what it should do
            pass

    def do_GET(self) -> None:
        self._stream(HUGE)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/generate":
            self._stream(GENERATE)
            return
        body = json.dumps({"error": {"message": ERROR}}).encode()
        self.send_response(409)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def _serving():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeEngine)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="fake-engine", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def fake_engine():
    with _serving() as url:
        yield url


fake_port = fake_engine  # the member's sync port: a URL (and a client) of its own


class PeakRss:
    """The process's largest resident set while it runs (sampled on a thread of its own)."""

    def __init__(self):
        self.proc, self.peak, self.done = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, name="rss", daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            if self.done.wait(0.01):
                return

    def __enter__(self) -> PeakRss:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join(10)


def _plan(version: int) -> WeightSyncPlan:
    return WeightSyncPlan(policy_version=version, group_name="", master_addr="", master_port=0,
                          world_size=1, backend="gloo", reform=False, buckets=[], deadline_s=30.0,
                          plan_id=f"p{version}",
                          members=[SyncMember(server_id=SID, rank_offset=1)],
                          path="disk", payloads=["unused"])


def _refused_total(client: str) -> float:
    return parse_exposition(Metrics().render().decode()).get(
        f'areal_answers_refused_total{{client="{client}"}}', 0.0)


def _syncs(engine: str, port: str):
    """A drive, and a callable running one failed sync of the member (whether it was lost)."""
    entry = RosterEntry(server_id=SID, engine_url=engine, engine_ranks=1,
                        policy_version=0, engine_kind="embedded", sync_url=port)
    drive, lost = EngineDrive(engine_key="k" * 32), []

    def sync(version: int) -> None:
        drive.start(_plan(version), [entry])
        results = drive.wait(time.monotonic() + 60)
        assert not results[SID].ok, results
        lost.append(drive.lost() == {SID})  # its engine's /health probed: no answer it would read

    return drive, sync, lost


def test_a_members_huge_health_answers_cost_the_trainer_no_memory(fake_engine, fake_port):
    drive, sync, lost = _syncs(fake_engine, fake_port)
    try:
        sync(1)  # the clients made, their first connections open
        refused_before, base = _refused_total("engine"), psutil.Process().memory_info().rss
        with PeakRss() as rss:
            for version in range(2, 2 + SYNCS):
                sync(version)
    finally:
        drive.close()
    assert rss.peak - base < MAX_GROWTH, f"grew by {(rss.peak - base) >> 20} MiB"
    assert _refused_total("engine") - refused_before >= SYNCS
    assert all(lost), lost


def test_a_members_error_text_and_id_stay_on_one_log_line(fake_engine, fake_port, caplog):
    """A member's id, error text and forged URL are quoted and cut on one line."""
    caplog.set_level(logging.WARNING, logger="trainer.engine_drive")
    for port in (fake_port, f"{fake_port}/\n{FORGED}"):
        drive, sync, _ = _syncs(fake_engine, port)
        try:
            sync(1)
        finally:
            drive.close()
    lines = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(lines) == 2, lines
    for line in lines:
        assert "\n" not in line and "FORGED" in line and len(line) < 2000, line[:3000]


def test_a_generate_answer_past_what_its_request_can_make_is_refused(fake_engine):
    async def scenario() -> EngineError:
        async with SGLangClient(fake_engine, api_key="k" * 32) as client:
            with pytest.raises(EngineError) as refused:
                await client.generate([1, 2, 3], {"max_new_tokens": 4}, timeout_s=60)
            return refused.value

    with PeakRss() as rss:
        base = psutil.Process().memory_info().rss
        error = asyncio.run(scenario())
    assert "/generate" in str(error) and fake_engine in str(error), error
    assert "over its limit of" in str(error), error
    assert rss.peak - base < GENERATE // 2, f"grew by {(rss.peak - base) >> 20} MiB"
