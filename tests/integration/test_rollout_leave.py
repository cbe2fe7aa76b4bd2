"""A rollout server stopped on request leaves the buffer's roster at once.

Real processes over loopback: the buffer daemon and one rollout server (embedded engine). With
``buffer.heartbeat_timeout_s`` and ``buffer.lease_timeout_s`` at 600 s, only the server's last
heartbeat (``leaving``, sent as SIGTERM stops it) can take it off the roster and hand its leases
back within this test's waits; before it, the buffer found out 15 s later (the default timeout),
and a weight sync under way waited that long for the member that had gone.
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


def test_a_server_stopped_on_request_leaves_the_roster_and_its_leases_at_once(
        spawn_python, tmp_run_dir, wait_until):
    cfg = load_config([
        f"run_dir={tmp_run_dir}", "security.curve=false",
        f"buffer.address=tcp://127.0.0.1:{free_port()}",
        f"buffer.pub_address=tcp://127.0.0.1:{free_port()}", "buffer.max_staleness=1000",
        "buffer.heartbeat_timeout_s=600", "buffer.lease_timeout_s=600", "buffer.fsync=never",
        "task.group_size=2", "task.max_new_tokens=32", "rollout.heartbeat_s=0.5"])
    config = tmp_run_dir / "config.yaml"
    config.write_text(to_yaml(cfg))
    ensure_key_file(tmp_run_dir)
    spawn_python("buffer", ["--config-file", config], capture=False)
    server = spawn_python("rollout_server", ["--config-file", config, "rollout.server_id=A",
                                             f"rollout.metrics_port={free_port()}"],
                          capture=False)
    trainer = Client(cfg.buffer.address, timeout_s=30, identity=TRAINER_PEER)

    def roster() -> set[str]:
        reply = trainer.request(RosterRequest())
        assert isinstance(reply, Roster)
        return {m.server_id for m in reply.members}

    def stats() -> dict:
        reply = trainer.request(StatsRequest())
        assert isinstance(reply, Stats)
        return reply.values

    try:
        wait_until(lambda: roster() == {"A"}, STARTUP_S, 0.2, "A on the roster")
        wait_until(lambda: stats().get("leases_of_A", 0) >= 1, STARTUP_S, 0.05, "A holding leases")
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        wait_until(lambda: "A" not in roster(), LEFT_S, 0.2, "A off the roster")
        left = stats()
        assert "leases_of_A" not in left and left["reissue_queue"] >= 1, left  # they went back
    finally:
        trainer.close()
