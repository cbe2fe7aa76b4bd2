"""A rollout server stopped on request leaves the roster at once (600 s timeouts: only its leaving
heartbeat can); a second server under the same id is refused (id_in_use) while the first is heard,
the first is told, and the second takes the id once the first leaves.
"""

from __future__ import annotations

import signal

from areal_like.net.auth import ensure_key_file
from areal_like.net.dealer import Client
from areal_like.net.distributed import free_port
from areal_like.net.peers import TRAINER_PEER
from areal_like.settings.config import load_config, to_yaml
from areal_like.wire.protocol import Roster, RosterRequest, Stats, StatsRequest

STARTUP_S = 180.0  # a daemon imports torch and builds its model; the shared 2-core machine is slow
LEFT_S = 60.0  # well under the 600 s after which the buffer would expire the server anyway


def _start_buffer(spawn_python, tmp_run_dir):
    cfg = load_config([
        f"run_dir={tmp_run_dir}", "security.curve=false",
        f"buffer.address=tcp://127.0.0.1:{free_port()}",
        f"buffer.pub_address=tcp://127.0.0.1:{free_port()}", "buffer.max_staleness=1000",
        "buffer.heartbeat_timeout_s=600", "buffer.lease_timeout_s=600", "buffer.fsync=never",
        "task.group_size=2", "task.max_new_tokens=256", "rollout.heartbeat_s=0.5"])
    config = tmp_run_dir / "config.yaml"
    config.write_text(to_yaml(cfg))
    ensure_key_file(tmp_run_dir)
    spawn_python("buffer", ["--config-file", config], capture=False)
    return cfg


def _server_a(spawn_python, tmp_run_dir, capture: bool = False):
    return spawn_python("rollout_server", ["--config-file", tmp_run_dir / "config.yaml",
                                           "rollout.server_id=A",
                                           f"rollout.metrics_port={free_port()}"],
                        capture=capture)


def _ask(trainer: Client, msg, reply_type):
    reply = trainer.request(msg)
    assert isinstance(reply, reply_type), reply
    return reply


def test_a_second_server_under_a_live_id_is_refused_and_the_first_stopped_leaves_at_once(
        spawn_python, tmp_run_dir, wait_until):
    cfg = _start_buffer(spawn_python, tmp_run_dir)
    first = _server_a(spawn_python, tmp_run_dir, capture=True)
    trainer = Client(cfg.buffer.address, timeout_s=30, identity=TRAINER_PEER)

    def incarnation() -> str | None:
        members = _ask(trainer, RosterRequest(), Roster).members
        return next((m.incarnation for m in members if m.server_id == "A"), None)

    def stats() -> dict:
        return _ask(trainer, StatsRequest(), Stats).values

    try:
        was = wait_until(incarnation, STARTUP_S, 0.2, "the first A on the roster")
        second = _server_a(spawn_python, tmp_run_dir, capture=True)
        # two refusals: the first (heartbeat_s=0.5) answered a heartbeat in between
        wait_until(lambda: stats().get("rejected_id_in_use", 0) >= 2, STARTUP_S, 0.2,
                   "the second A refused twice")
        assert incarnation() == was and second.poll() is None  # it keeps retrying
        # stopped while it holds leases (256-token episodes: it holds them for a while)
        wait_until(lambda: stats().get("leases_of_A", 0) >= 1, STARTUP_S, 0.05, "A holding leases")
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=LEFT_S)
        assert first.returncode == 0, err[-2000:]
        told = [line for line in err.splitlines() if "a Register under this server's id" in line]
        assert told and " WARNING " in told[0] and "incarnation" in told[0], err[-2000:]
        assert not [line for line in err.splitlines() if " ERROR " in line], err[-2000:]
        # the 600 s timeouts would keep the first on the roster: only its leaving heartbeat lets
        # the second in this soon (the buffer's side, leases given back at once on leaving:
        # tests/unit/test_departed_leases.py)
        now = wait_until(lambda: (i := incarnation()) not in (None, was) and i, LEFT_S, 0.2,
                         "the second A registered once the first left")
        assert now != was and stats()["credits_released"] >= 1  # the first's leases went back
        second.send_signal(signal.SIGTERM)
        _, err2 = second.communicate(timeout=60)
        assert second.returncode == 0, err2[-2000:]
        assert "registration refused (id_in_use: server id 'A' is held by a live process" in err2
    finally:
        trainer.close()
