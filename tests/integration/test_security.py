"""CURVE on the buffer's sockets with real processes: strangers get nothing and are counted.

Strangers (no CURVE, a key not allowed, not knowing the server key) try to register, send, ask
for a Batch and listen: each times out with nothing, auth_refused counts them by reason, and the
job's own traffic goes on.
"""

from __future__ import annotations

import json
import os
import stat

from test_buffer_service import make_group

from areal_like.net import security
from areal_like.net.dealer import Client
from areal_like.net.distributed import free_port
from areal_like.net.metrics import scrape
from areal_like.net.peers import TRAINER_PEER
from areal_like.net.pubsub import Subscriber
from areal_like.settings.config import (
    BufferConfig,
    RunConfig,
    SecurityConfig,
    TaskConfig,
    TrainerConfig,
    to_yaml,
)
from areal_like.wire import protocol as P

# the job's own requests: a live buffer answers in milliseconds on a loaded machine too
REQUEST_S = 30.0
STRANGER_REQUEST_S = 3.0  # each stranger request waits this long for an answer that must never come

STRANGER = r"""
import json, sys
from pathlib import Path
from areal_like.wire import protocol as P
from areal_like.net import security
from areal_like.wire.trajectory import Trajectory, as_f32, as_i32
from areal_like.net.pubsub import Subscriber
from areal_like.net.dealer import Client
from areal_like.net.transport import TransportTimeout

address, pub_address, mode, keys_dir, stop_file, wait_s = sys.argv[1:7]
keys = None
if mode != "none":  # a CURVE client: its own key pair (never allowed), the server's key or not
    own = security.load(keys_dir, "trainer")
    theirs = own if mode == "wrong_server" else security.load(sys.argv[7], "trainer")
    keys = security.Keys("trainer", own.public, own.secret, theirs.server_public)
sub = Subscriber(pub_address, keys=keys)
client = Client(address, keys=keys, timeout_s=float(wait_s))
traj = Trajectory.of(prompt_ids=as_i32([1]), output_ids=as_i32([2, 3]),
                     behav_logp=as_f32([-1.0, -1.0]), versions=as_i32([0, 0]), reward=1.0,
                     finish_reason="stop")
requests = [P.Register(server_id="stranger", engine_url="http://127.0.0.1:1", policy_version=0),
            P.TrajectoryGroup(group_id="stranger-g", server_id="stranger", lease_id="x",
                              prompt_index=0, epoch=0, trajectories=[traj, traj]),
            P.BatchRequest(n_groups=1, trainer_version=0, wait_s=0.0),
            P.RosterRequest()]
out = {"requests": {}, "announcements": []}
for msg in requests:
    try:
        out["requests"][msg.TYPE] = type(client.request(msg)).__name__
    except TransportTimeout:
        out["requests"][msg.TYPE] = "timeout"
print("listening", flush=True)
while not Path(stop_file).exists():  # the test announces versions until every stranger listened
    got = sub.recv(0.2)
    if got is not None:
        out["announcements"].append(got.TYPE)
print(json.dumps(out), flush=True)
"""


def areal_like(spawn_python, *args) -> tuple[int, str, str]:
    proc = spawn_python("launch.cli", list(args))
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_keys_are_private_files_and_a_secret_key_file_others_may_read_is_refused(
        tmp_run_dir, spawn_python):
    """No keys: the buffer refuses to start naming the command. `areal-like keys` writes 0600
    files in 0700 directories and keeps them on a restart. A readable (0644) secret key file:
    each daemon and `keys` exit 2 naming it and chmod 600."""
    from areal_like.net.auth import ENGINE_KEY_ENV, KEY_FILE, ensure_key_file

    config = tmp_run_dir / "config.yaml"
    config.write_text(to_yaml(RunConfig(run_dir=str(tmp_run_dir))))
    proc = spawn_python("buffer", ["--config-file", config])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "server.key is missing" in err and "areal-like keys RUN_DIR" in err
    code, _, err = areal_like(spawn_python, "keys", tmp_run_dir)
    assert code == 0, err
    keys = tmp_run_dir / "keys"
    names = sorted(str(p.relative_to(keys)) for p in keys.rglob("*") if p.is_file())
    assert names == ["clients/rollout.key", "clients/rollout.key_secret", "clients/trainer.key",
                     "clients/trainer.key_secret", "server.key", "server.key_secret"]
    for p in [keys, keys / "clients", *keys.rglob("*")]:
        mode = stat.S_IMODE(os.stat(p).st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))
    before = (keys / "server.key_secret").read_bytes()
    code, out, _ = areal_like(spawn_python, "keys", tmp_run_dir)
    # a restart keeps them
    assert code == 0 and "kept" in out and (keys / "server.key_secret").read_bytes() == before
    assert (security.load(keys, "rollout").server_public
            == security.load(keys, security.SERVER).public)
    ensure_key_file(tmp_run_dir)
    server_secret, engine_key = keys / "server.key_secret", tmp_run_dir / KEY_FILE
    server_secret.chmod(0o644)
    engine_key.chmod(0o644)
    procs = {m: spawn_python(m, ["--config-file", config], env={ENGINE_KEY_ENV: ""})
             for m in ("buffer", "rollout_server", "trainer", "rollout_server.engine")}
    procs["keys"] = spawn_python("launch.cli", ["keys", tmp_run_dir])
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        path = server_secret if name in ("buffer", "keys") else engine_key
        assert proc.returncode == 2 and "Traceback" not in err, (name, err)
        assert err.count(f"chmod 600 {path}") == 1 and "mode 0644" in err, (name, err)


def test_strangers_get_nothing_are_counted_and_the_job_goes_on(
        tmp_run_dir, tmp_path, spawn_python, wait_until):
    metrics_port = free_port()
    cfg = RunConfig(run_dir=str(tmp_run_dir), task=TaskConfig(num_prompts=100), buffer=BufferConfig(
        address=f"tcp://127.0.0.1:{free_port()}", pub_address=f"tcp://127.0.0.1:{free_port()}",
        groups_per_step=1, metrics_port=metrics_port, heartbeat_timeout_s=600,
        # CURVE decrypted on two I/O threads: still every stranger refused and counted
        io_threads=2))
    (tmp_run_dir / "config.yaml").write_text(to_yaml(cfg))
    # other: another job's keys (valid CURVE, not ours)
    keys, other = tmp_run_dir / "keys", tmp_path / "other"
    security.make_keys(keys)
    security.make_keys(other)
    spawn_python("buffer", ["--config-file", tmp_run_dir / "config.yaml"], capture=False)
    stop_file = tmp_path / "stop"
    member = security.load(keys, "rollout")
    rollout = Client(cfg.buffer.address, keys=member, timeout_s=REQUEST_S, identity="real")
    real_sub = Subscriber(cfg.buffer.pub_address, keys=member)
    trainer = Client(cfg.buffer.address, keys=security.load(keys, "trainer"), timeout_s=REQUEST_S,
                     identity=TRAINER_PEER)
    assert isinstance(trainer.request(P.StatsRequest()), P.Stats)  # up, and our keys are accepted
    strangers = {mode: spawn_python(STRANGER, [cfg.buffer.address, cfg.buffer.pub_address, mode,
                                               other, stop_file, STRANGER_REQUEST_S, keys])
                 for mode in ("none", "wrong_client", "wrong_server")}
    # the real job: register, take a credit, send its group, train on it
    ack = rollout.request(P.Register(server_id="real", engine_url="http://127.0.0.1:1",
                                     policy_version=0))
    assert isinstance(ack, P.RegisterAck)
    credit = rollout.request(P.CreditRequest(server_id="real", max_credits=1)).credits[0]
    assert rollout.request(make_group(credit, "real")).status == "accepted"
    batch = trainer.request(P.BatchRequest(n_groups=1, trainer_version=0, wait_s=10.0))
    assert [g.group_id for g in batch.groups] == [f"real-{credit.lease_id}"]
    # versions are announced while every stranger listens; the real subscriber gets them
    for proc in strangers.values():
        assert proc.stdout.readline().strip() == "listening", proc.stderr.read()
    received, version = [], 1
    while len(received) < 3:
        assert trainer.request(P.VersionUpdate(policy_version=version)).status == "ok"
        version += 1
        if (got := real_sub.recv(1.0)) is not None and got.TYPE == "version_update":
            received.append(got.policy_version)
    stop_file.touch()
    roster = trainer.request(P.RosterRequest())
    stats = trainer.request(P.StatsRequest()).values
    for mode, proc in strangers.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (mode, err)
        result = json.loads(out.strip().splitlines()[-1])
        assert result == {"requests": {"register": "timeout", "trajectory_group": "timeout",
                                       "batch_request": "timeout", "roster_request": "timeout"},
                          "announcements": []}, mode
    assert [m.server_id for m in roster.members] == ["real"]  # no stranger registered
    assert stats["groups_accepted"] == 1 and stats.get("rejected_decode", 0) == 0
    assert stats["auth_refused_unknown_key"] >= 1 and stats["auth_refused_handshake"] >= 2
    exported = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
    assert exported['areal_buffer_auth_refused_total{reason="unknown_key"}'] >= 1
    assert exported['areal_buffer_auth_refused_total{reason="handshake"}'] >= 2
    rollout.close(), trainer.close(), real_sub.close()


def test_a_one_rank_trainer_opens_no_port_on_every_interface(spawn_python):
    """A one-rank trainer's store is in-process; gloo binds one address."""
    proc = spawn_python("""
        import json, os, psutil
        from areal_like.settings.config import RunConfig
        from trainer.model import init_distributed
        init_distributed(RunConfig().trainer)
        print(json.dumps([c.laddr.ip for c in psutil.net_connections("inet")
                          if c.pid == os.getpid() and c.status == psutil.CONN_LISTEN]))
    """)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    listening = json.loads(out.strip().splitlines()[-1])
    assert not {"0.0.0.0", "::"} & set(listening), listening


def test_only_trainer_rank_0_needs_the_trainer_key(tmp_run_dir, tmp_path, spawn_python):
    security.make_keys(tmp_path / "all")
    node = tmp_path / "node"
    node.mkdir(mode=0o700)
    (node / "server.key").write_bytes((tmp_path / "all" / "server.key").read_bytes())
    cfg = RunConfig(run_dir=str(tmp_run_dir), security=SecurityConfig(keys_dir=str(node)),
                    trainer=TrainerConfig(buffer_address=f"tcp://127.0.0.1:{free_port()}"))
    (tmp_run_dir / "config.yaml").write_text(to_yaml(cfg))
    code = """
        import sys, trainer.loop
        from trainer.__main__ import main
        trainer.loop.train = lambda cfg, keys: print("keys", keys) or 0  # the ranks' own work
        sys.exit(main(sys.argv[1:]))
    """
    ranks = {rank: spawn_python(code, ["--config-file", tmp_run_dir / "config.yaml"],
                                env={"RANK": rank}) for rank in ("0", "1")}
    (_, err0), (out1, err1) = (ranks[r].communicate(timeout=120) for r in ("0", "1"))
    assert ranks["1"].returncode == 0 and "keys None" in out1, err1
    assert ranks["0"].returncode == 2 and "trainer.key_secret is missing" in err0, err0
