"""Rollout servers + buffer daemon + this process as trainer, real processes over loopback, in
one run: groups flow, a kill -9 of a rollout server, a drain-mode weight sync, a buffer kill -9."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import torch

from areal_like.net.auth import engine_api_key, ensure_key_file
from areal_like.net.dealer import Client
from areal_like.net.distributed import free_port
from areal_like.net.metrics import scrape
from areal_like.net.peers import TRAINER_PEER
from areal_like.settings.config import load_config, to_yaml
from areal_like.weights.hf import build_model
from areal_like.wire.protocol import (
    Ack,
    Batch,
    BatchRequest,
    Roster,
    RosterRequest,
    Stats,
    StatsRequest,
    VersionUpdate,
)
from rollout_server.server import BUFFER_TIMEOUT_S
from trainer.engine_drive import EngineDrive
from trainer.weight_sync import WeightBroadcaster

STARTUP_S = 180.0  # a daemon imports torch and builds its model; the shared 2-core machine is slow


def write_config(run_dir: Path) -> tuple[Path, object]:
    # short leases so a dead server's prompts come back quickly, yet long enough that a group of
    # 2 x 32 tokens finishes well within one on a loaded machine (or its lease is re-issued too)
    cfg = load_config([
        f"run_dir={run_dir}", "security.curve=false",
        f"buffer.address=tcp://127.0.0.1:{free_port()}",
        f"buffer.pub_address=tcp://127.0.0.1:{free_port()}", "buffer.max_staleness=1000",
        "buffer.groups_per_step=2", "buffer.lease_timeout_s=6", "buffer.heartbeat_timeout_s=6",
        "buffer.fsync=never",
        "task.group_size=2", "task.max_new_tokens=32", "rollout.max_concurrent_groups=2",
        "rollout.heartbeat_s=0.5",
    ])
    path = run_dir / "config.yaml"
    path.write_text(to_yaml(cfg))
    ensure_key_file(run_dir)  # the job's engine key, as `areal-like run` writes it
    return path, cfg


def metric(port: int, name: str) -> float:
    try:
        return scrape(f"http://127.0.0.1:{port}/metrics").get(name, 0.0)
    except OSError:
        return 0.0


class Consumer:
    """The trainer's data side: batches, version announcements, stats."""

    def __init__(self, address: str):
        self.client = Client(address, timeout_s=30, identity=TRAINER_PEER)
        self.consumed: list = []
        self.version = 0
        # acked with the next request, as the trainer does (else it is handed out again)
        self.last_batch = ""

    def take_batch(self) -> bool:
        batch = self.client.request(BatchRequest(n_groups=2, trainer_version=self.version,
                                                 wait_s=0.5,
                                                 ack_batch=self.last_batch))
        assert isinstance(batch, Batch)
        if not batch.groups:
            return False
        self.last_batch = batch.batch_id
        self.consumed.extend(batch.groups)
        self.announce(self.version + 1)
        return True

    def announce(self, version: int) -> None:
        assert isinstance(self.client.request(VersionUpdate(policy_version=version)), Ack)
        self.version = version

    def stats(self) -> dict:
        reply = self.client.request(StatsRequest())
        assert isinstance(reply, Stats)
        return reply.values

    def assert_no_prompt_twice(self) -> None:
        keys = [(g.prompt_index, g.epoch) for g in self.consumed]
        assert len(keys) == len(set(keys)), "a prompt was delivered twice"


def test_groups_flow_kill9_weight_sync_and_buffer_restart(spawn_python, tmp_run_dir, wait_until):
    config, cfg = write_config(tmp_run_dir)
    buffer = spawn_python("buffer", ["--config-file", config], capture=False)
    a_port, b_port, engine_port = free_port(), free_port(), free_port()
    a = spawn_python("rollout_server", ["--config-file", config, "rollout.server_id=A",
                                        f"rollout.metrics_port={a_port}"], capture=False)
    # B attaches by URL to a standalone engine process and drains in-flight work before a sync;
    # everything starts at once (process start-up dominates this test on a loaded machine)
    spawn_python("rollout_server.engine", ["--config-file", config, "--port", engine_port],
                 capture=False)
    b = spawn_python("rollout_server", ["--config-file", config, "rollout.server_id=B",
                                        f"rollout.metrics_port={b_port}",
                                        "rollout.engine.kind=url",
                                        f"rollout.engine.url=http://127.0.0.1:{engine_port}",
                                        "rollout.drain_on_update=true"], capture=False)
    c = Consumer(cfg.buffer.address)
    try:
        # 1. groups flow through the buffer to the consumer, and the servers see them acked
        wait_until(lambda: c.take_batch() and len(c.consumed) >= 4, STARTUP_S, 0.0, "two batches")
        g = c.consumed[0]
        assert g.group_id == f"{g.server_id}-{g.lease_id}" and len(g.trajectories) == 2
        for t in g.trajectories:
            assert (1 <= len(t.output_ids) <= 32
                    and len(t.behav_logp) == len(t.versions) == len(t.output_ids))
            assert (t.behav_logp <= 0).all() and t.prompt_ids[0] == 1
        wait_until(lambda: metric(a_port, "areal_rollout_groups_acked_total") >= 2, STARTUP_S, 0.1,
                   "A's acks")
        assert metric(a_port, "areal_rollout_tokens_generated_total") > 0
        series = scrape(f"http://127.0.0.1:{a_port}/metrics")  # strangers of its engine and doors
        assert series['areal_refused_total{port="engine"}'] == 0, sorted(series)
        assert series['areal_refused_total{port="weight_sync"}'] == 0
        # after its first leases, a server gets its next ones with its groups' acks
        wait_until(lambda: metric(a_port, 'areal_rollout_leases_received_total{via="ack"}') >= 1,
                   60, 0.1,
                   "leases with acks")

        # 2. kill -9 A while it generates; A's leased prompts come back (lease timeout) and B
        # makes them
        wait_until(lambda: metric(a_port, "areal_rollout_requests_in_flight") >= 1, 60, 0.01,
                   "A generating")
        acked_by_a = metric(a_port, "areal_rollout_groups_acked_total")
        spawn_python.kill9(a)
        cursor = c.stats()["cursor_index"]

        def covered() -> bool:
            c.take_batch()
            return {g.prompt_index for g in c.consumed} >= set(range(cursor))
        wait_until(covered, STARTUP_S, 0.0, f"every prompt below {cursor} delivered")
        c.assert_no_prompt_twice()
        # every group A had acked is for a prompt below the cursor, and all of those were consumed
        assert len([g for g in c.consumed if g.server_id == "A"]) >= acked_by_a, (
            "a group acked to A was lost")
        assert c.stats().get("credits_reissued", 0) >= 1, "A's in-flight prompts were not re-issued"

        # 3. a weight sync driven from here: B's engine joins the group and loads the version
        new_version = weight_sync(c, cfg, wait_until)
        # through B's sync port: the trainer told B the sync's end (RolloutServer.end)
        assert metric(b_port, "areal_rollout_weight_sync_pause_seconds_count") == 1
        wait_until(lambda: metric(b_port, "areal_rollout_policy_version") == new_version, 30, 0.1,
                   "B's version")

        def new_tokens_arrived() -> bool:
            c.take_batch()
            return any(new_version in t.versions for g in c.consumed for t in g.trajectories
                       if g.server_id == "B")
        wait_until(new_tokens_arrived, 120, 0.0, f"tokens generated by version {new_version}")

        # 4. kill -9 the buffer and restart it on the same run directory
        spawn_python.kill9(buffer)
        before = len(c.consumed)
        # longer than the server's send timeout: ZMQ would otherwise deliver the queued frame on
        # reconnect; this way sends time out and the groups wait in B's unacked map to be re-sent
        time.sleep(BUFFER_TIMEOUT_S + 1.0)
        spawn_python("buffer", ["--config-file", config], capture=False)
        wait_until(lambda: c.take_batch() and len(c.consumed) >= before + 4, STARTUP_S, 0.0,
                   "batches after restart")
        # B's groups that finished while the buffer was down are re-sent after its send timeout and
        # backoff, which may come after the batches above (new groups can overtake them):
        # wait for it
        wait_until(lambda: c.take_batch() is not None
                   and metric(b_port, "areal_rollout_groups_resent_total") >= 1,
                   60, 0.2, "B re-sent the groups the dead buffer never acked")
        c.assert_no_prompt_twice()
        assert metric(b_port, "areal_rollout_groups_acked_total") >= 1
        os.kill(b.pid, signal.SIGTERM)  # before the buffer, so its last sends are answered
        b.wait(timeout=60)
    finally:
        c.client.close()


def weight_sync(c: Consumer, cfg, wait_until) -> int:
    """Rank 0's push of a new model to B's engine via B's sync port, then the announce."""
    def only_b() -> bool:  # A leaves the roster once its heartbeats are overdue
        roster = c.client.request(RosterRequest())
        return isinstance(roster, Roster) and [m.server_id for m in roster.members] == ["B"]
    wait_until(only_b, 60, 0.1, "A gone from the roster")
    key = engine_api_key(cfg.run_dir)
    drive = EngineDrive(engine_key=key, pause_mode=cfg.rollout.pause_mode)
    pusher = WeightBroadcaster(replace(cfg.trainer.weight_sync, deadline_s=120.0),
                               buffer_address=cfg.buffer.address, rank=0,
                               device=torch.device("cpu"), send_dtype=cfg.model.dtype,
                               engine_key=key, drive=drive)
    version = c.version + 1
    try:
        report = pusher.push(build_model(replace(cfg.model, init_seed=1)), version)
    finally:
        pusher.close()
    assert report.members == report.done == ["B"] and report.reform, report
    assert not report.dropped and not report.error, report
    assert report.pause_s["B"] > 0, report  # its engine paused for the load
    c.version = version  # the push announced it
    return version
