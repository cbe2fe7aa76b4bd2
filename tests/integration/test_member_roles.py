"""Members by key, not by socket: a rollout-key attacker against a real CURVE buffer on tcp."""

from __future__ import annotations

from test_buffer_service import make_group

from areal_like.net import security
from areal_like.net.dealer import Client
from areal_like.net.distributed import free_port
from areal_like.settings.config import BufferConfig, RunConfig, TaskConfig, to_yaml
from areal_like.wire import protocol as P
from buffer.facts import MIN_SERVERS

REQUEST_S = 30.0  # a live buffer answers in milliseconds, on a loaded machine too
FLOOD = 120  # Registers in the flood, each from a fresh socket (the attack campaign sent 1,000)


def start_buffer(run_dir, spawn_python):
    """A CURVE buffer daemon over tcp: (cfg, rollout client, trainer client, the process)."""
    cfg = RunConfig(run_dir=str(run_dir), task=TaskConfig(num_prompts=100), buffer=BufferConfig(
        address=f"tcp://127.0.0.1:{free_port()}", pub_address=f"tcp://127.0.0.1:{free_port()}",
        groups_per_step=1, heartbeat_timeout_s=600))
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    security.make_keys(run_dir / "keys")
    proc = spawn_python("buffer", ["--config-file", run_dir / "config.yaml"])
    rollout = Client(cfg.buffer.address, keys=security.load(run_dir / "keys", "rollout"),
                     timeout_s=REQUEST_S, identity="real")
    trainer = Client(cfg.buffer.address, keys=security.load(run_dir / "keys", "trainer"),
                     timeout_s=REQUEST_S, identity="trainer")
    assert isinstance(trainer.request(P.StatsRequest()), P.Stats)  # up, and our keys are accepted
    ack = rollout.request(
        P.Register(server_id="real", engine_url="http://127.0.0.1:1", policy_version=0)
    )
    assert isinstance(ack, P.RegisterAck)
    return cfg, rollout, trainer, proc


def fresh_socket_request(cfg, keys: security.Keys, msg: P.Message) -> P.Message:
    """One request from a socket of its own under ``keys`` (what a flood of fresh sockets sends)."""
    client = Client(cfg.buffer.address, keys=keys, timeout_s=REQUEST_S)
    try:
        return client.request(msg)
    finally:
        client.close()


def test_a_rollout_key_is_held_to_its_role_its_own_ids_and_its_cap(tmp_run_dir, spawn_python):
    """One CURVE buffer, an attacker holding the rollout key: it cannot take an id a live server
    holds (the server is told), take or settle the trainer's batch, read the roster, or flood the
    roster from fresh sockets; the real server goes on throughout."""
    cfg, rollout, trainer, proc = start_buffer(tmp_run_dir, spawn_python)
    attacker = security.load(tmp_run_dir / "keys", "rollout")
    real = trainer.request(P.RosterRequest()).members[0]
    for incarnation in (real.incarnation, "f" * 16):
        reply = fresh_socket_request(cfg, attacker, P.Register(
            server_id="real", engine_url="http://127.0.0.1:9", sync_url="http://127.0.0.1:9",
            policy_version=0, incarnation=incarnation))
        assert isinstance(reply, P.Ack) and reply.status == "rejected", reply
        assert reply.reason.startswith("id_in_use: server id 'real' is held by a live process")
    entry = trainer.request(P.RosterRequest()).members[0]
    assert (entry.engine_url, entry.sync_url, entry.incarnation) == (
        real.engine_url, real.sync_url, real.incarnation)
    beat = rollout.request(P.Heartbeat(server_id="real", policy_version=0))
    assert beat.known and beat.challenged.startswith("a Register under this server's id"), beat
    assert "'http://127.0.0.1:9'" in beat.challenged
    assert not rollout.request(P.Heartbeat(server_id="real", policy_version=0)).challenged  # once

    # the real server's groups are still accepted: enough for the trainer's batch and the attacker's
    credits = [rollout.request(P.CreditRequest(server_id="real", max_credits=1)).credits[0]
               for _ in range(3)]
    assert all(rollout.request(make_group(c, "real")).status == "accepted" for c in credits)
    batch = trainer.request(P.BatchRequest(n_groups=1, trainer_version=0, wait_s=10.0))
    # in transit until the trainer's next request
    assert [g.group_id in {f"real-{c.lease_id}" for c in credits} for g in batch.groups] == [True]
    take = P.BatchRequest(n_groups=1, trainer_version=0, wait_s=0.0)
    replies = [fresh_socket_request(cfg, attacker, take) for _ in range(6)]
    assert all(isinstance(r, P.Batch) and not r.groups and r.reason.startswith("role: ")
               for r in replies), replies
    nxt = trainer.request(P.BatchRequest(n_groups=1, trainer_version=0, wait_s=10.0,
                                         ack_batch=batch.batch_id))
    assert len(nxt.groups) == 1 and nxt.groups[0].group_id != batch.groups[0].group_id
    stats = trainer.request(P.StatsRequest()).values
    assert stats["groups_consumed"] == 1, stats  # the first batch was received, once
    assert stats.get("batches_redelivered", 0) == 0 and stats["rejected_role"] == 6, stats
    # only the trainer's key reads the roster (engine/sync URLs, incarnations)
    replies = [fresh_socket_request(cfg, attacker, P.RosterRequest()) for _ in range(3)]
    replies.append(rollout.request(P.RosterRequest()))  # the real server's own socket alike
    assert all(isinstance(r, P.Ack) and r.status == "rejected"
               and r.reason.startswith("role: a 'rollout' key may not send roster_request")
               for r in replies), replies

    replies = [fresh_socket_request(cfg, attacker, P.Register(
        server_id=f"fake-{i}", engine_url="http://x", policy_version=0)) for i in range(FLOOD)]
    accepted = [r for r in replies if isinstance(r, P.RegisterAck)]
    refused = [r for r in replies if isinstance(r, P.Ack) and r.status == "rejected"]
    # the key's allowance (the real server holds one)
    assert len(accepted) <= MIN_SERVERS - 1 + 2, len(accepted)
    assert len(refused) == FLOOD - len(accepted)
    assert all(r.reason.startswith("peer_limit") for r in refused)
    roster = [m.server_id for m in trainer.request(P.RosterRequest()).members]
    assert "real" in roster and len(roster) <= MIN_SERVERS, roster
    # the real server goes on: it heartbeats, re-registers and is granted credits as before
    assert rollout.request(P.Heartbeat(server_id="real", policy_version=0)).known
    reply = rollout.request(P.Register(server_id="real", engine_url="http://127.0.0.1:1"))
    assert isinstance(reply, P.RegisterAck)
    assert rollout.request(P.CreditRequest(server_id="real", max_credits=1)).credits
    stats = trainer.request(P.StatsRequest()).values
    assert (stats["rejected_id_in_use"], stats["rejected_role"], stats["rejected_peer_limit"]) == (
        2, 6 + 4, len(refused)), stats
    rollout.close(), trainer.close()
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    about = [line for line in err.splitlines() if "fake-" in line]
    # the accepted ids, and a rate-limited refusal line
    assert len(about) <= 3 * MIN_SERVERS, about[:20]
