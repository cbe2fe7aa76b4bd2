"""The attacks of ``benchmarks/attack_campaign.py``, each against a running job (``Target``).

Each attack is ``fn(target) -> (contained, what was seen)``, bounded in count and time, on
127.0.0.1 only, and closes every socket and process it opened. ``ATTACKS`` lists them in the
order the campaign runs them (the NaN group last among those against the live job: it may break
the model if admission lets it through).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import pickle
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import zmq

from areal_like.job_facts import request_frame_limit
from areal_like.net import security
from areal_like.net.auth import read_key_file
from areal_like.net.dealer import Client
from areal_like.net.transport import TransportTimeout
from areal_like.wire import protocol as P
from areal_like.wire.trajectory import Trajectory, as_f32, as_i32

REQUEST_S = 20.0
NESTED_DEPTH = 50_000


class Target:
    """What an attacker with the job's rollout key, or a stranger on loopback, can address."""

    def __init__(self, cfg, topo, run_dir: Path, sup):
        self.cfg, self.topo, self.run_dir, self.sup = cfg, topo, Path(run_dir), sup
        self.keys_dir = cfg.resolve_path(cfg.security.keys_dir)
        self.rollout = security.load(self.keys_dir, "rollout")
        self.trainer = security.load(self.keys_dir, "trainer")
        self.address = cfg.buffer.address
        self.observer = Client(
            self.address, keys=self.trainer, timeout_s=REQUEST_S, identity="campaign"
        )  # reads stats
        self.buffer_metrics = next(s.metrics_port for s in topo.slots if s.kind == "buffer")
        self.engine_key = read_key_file(run_dir)
        self.engines = [m.engine_url for m in self.roster()]  # before any attack restarts anything

    def stats(self) -> dict:
        return self.observer.request(P.StatsRequest()).values

    def roster(self) -> list[P.RosterEntry]:
        return self.observer.request(P.RosterRequest()).members

    def buffer_pid(self) -> int | None:
        return self.sup.pids().get("buffer")

    def fresh(self, msg: P.Message, keys=None, timeout_s: float = REQUEST_S) -> P.Message | str:
        """One request from a socket of its own (a member can open them at will)."""
        client = Client(self.address, keys=keys or self.rollout, timeout_s=timeout_s)
        try:
            return client.request(msg)
        except TransportTimeout:
            return "timeout"
        finally:
            client.close()

    def close(self) -> None:
        self.observer.close()


def _health(port: int, timeout_s: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=timeout_s) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def batch_theft(t: Target) -> tuple[bool, str]:
    """Issue 42 item 2: a rollout key asks for batches from 40 fresh sockets."""
    before, replies = t.stats(), []
    for _ in range(40):  # at the trainer's version, as the trainer asks (a batch is never stale)
        version = t.observer.request(P.RosterRequest()).policy_version
        replies.append(t.fresh(P.BatchRequest(n_groups=1, trainer_version=version, wait_s=0.0)))
    got = sum(len(r.groups) for r in replies if isinstance(r, P.Batch))
    after = t.stats()
    redelivered = after.get("batches_redelivered", 0) - before.get("batches_redelivered", 0)
    refused = sum(isinstance(r, P.Batch) and r.reason.startswith("role") for r in replies)
    return (
        got == 0 and redelivered == 0,
        f"{refused}/40 refused for their role, {got} groups taken, "
        f"{redelivered} trainer batches re-delivered",
    )


def register_flood(t: Target) -> tuple[bool, str]:
    """Issue 42 item 3: 300 Registers of fresh ids, each from a fresh socket."""
    t0 = time.monotonic()
    replies = [
        t.fresh(
            P.Register(
                server_id=f"flood-{os.getpid()}-{i}",
                engine_url="http://127.0.0.1:9",
                policy_version=0,
            )
        )
        for i in range(300)
    ]
    accepted = sum(isinstance(r, P.RegisterAck) for r in replies)
    fake = sum(m.server_id.startswith("flood-") for m in t.roster())
    allowance = 2 * t.cfg.launch.num_rollout_servers
    return (
        fake <= max(8, allowance),
        f"{accepted}/300 accepted in {time.monotonic() - t0:.1f}s, "
        f"{fake} fake ids on the roster (each would join the next weight sync)",
    )


def _stranger_401(port: int, request: bytes) -> socket.socket | None:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(request)
        s.recv(4096)
    except OSError:
        pass
    return s


def metrics_strangers(t: Target) -> tuple[bool, str]:
    """Issue 42 item 4: 64 keep-alive connections after a 401 (or a /health) and 64 silent ones."""
    port, socks = t.buffer_metrics, []
    ask = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n\r\n"
    try:
        socks += [_stranger_401(port, ask) for _ in range(64)]
        socks += [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(64)]
        status = _health(port)
    finally:
        for s in socks:
            s.close()
    return status == 200, f"/health answered {status} beside 128 strangers"


def engine_lockout(t: Target) -> tuple[bool, str]:
    """Issue 42 item 5: 520 keyless connections on an engine, each kept open after its 401.
    (Silent ones hold their slot until the 10 s header deadline: areal_like/SECURITY.md.)"""
    url = t.engines[0] if t.engines else None
    if url is None:
        return False, "no engine on the roster"
    port, socks = int(url.rsplit(":", 1)[1]), []
    ask = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    try:
        socks += [_stranger_401(port, ask) for _ in range(520)]
        req = urllib.request.Request(
            url + "/model_info", headers={"Authorization": f"Bearer {t.engine_key}"}
        )
        try:
            status = urllib.request.urlopen(req, timeout=10).status
        except urllib.error.HTTPError as e:
            status = e.code
    finally:
        for s in socks:
            s.close()
    return (
        status == 200,
        f"a client with the key got {status} beside 520 strangers kept after their 401",
    )


WORKER_ATTACK = """
import os

def attack(run_dir, parent_pid):
    got = []
    for rel in ("secrets/engine_api_key", "keys/server.key_secret",
                "keys/clients/trainer.key_secret"):
        try:
            open(os.path.join(run_dir, rel)).read()
            got.append("read " + rel)
        except OSError:
            pass
    try:
        os.kill(parent_pid, 0)
        got.append("may signal the rollout server")
    except OSError:
        pass
    try:  # a host-wide control guarded by mode alone for uid 0: opened, closed, never written
        os.close(os.open("/proc/sys/kernel/core_pattern", os.O_WRONLY))
        got.append("may write /proc/sys/kernel/core_pattern")
    except OSError:
        pass
    return got
"""


def worker_secrets(t: Target) -> tuple[bool, str]:
    """Issue 42 item 6: a reward worker, started as the rollout server starts it (its private
    directories hidden), reads the job's keys and signals the process that started it; issue 64
    item 1: it opens a host-wide control for writing (never writes it)."""
    import sys

    from benchmarks.sandbox_call import run_sandboxed
    from rollout_server import __main__ as rollout_main
    from rollout_server import sandbox

    hide = getattr(sandbox, "hide", None)  # absent in older builds: workers ran as the job's user
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "campaign_attack.py").write_text(WORKER_ATTACK)
        os.chmod(tmp, 0o755)  # root's workers run as a uid of their own: it must read the attack
        sys.path.insert(0, tmp)
        try:
            hidden = hide(rollout_main.private_dirs(t.cfg)) if hide else False
            got = run_sandboxed(
                "campaign_attack:attack",
                (str(t.run_dir), os.getpid()),
                sandbox.SandboxLimits(timeout_s=30),
            )
        finally:
            sys.path.remove(tmp)
            if hide:
                hide(None)
    reached = got.value if got.ok else [f"call failed: {got.reason}"]
    return got.ok and not reached, f"hidden={hidden}; reached: {', '.join(reached) or 'nothing'}"


def _raw_member(t: Target) -> zmq.Socket:
    """A CURVE DEALER under the rollout key that sends frames as it likes (not through Client)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    security.apply(sock, t.rollout)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(t.address)
    return sock


def _ask_raw(sock: zmq.Socket, frames: list[bytes], timeout_s: float = 10.0) -> list[bytes] | None:
    sock.send_multipart(frames)
    if sock.poll(int(timeout_s * 1000)):
        return sock.recv_multipart()
    return None


def _buffer_alive(t: Target, pid: int | None) -> bool:
    return t.buffer_pid() == pid and isinstance(
        t.fresh(P.StatsRequest(), keys=t.trainer, timeout_s=10), P.Stats
    )


def malformed_frames(t: Target) -> tuple[bool, str]:
    """Garbage, a wrong frame count and a frame over the buffer's limit, from a member, on the CURVE
    port."""
    pid, sock = t.buffer_pid(), _raw_member(t)
    try:
        answers = [
            _ask_raw(sock, frames)
            for frames in (
                [b"r1", b"\xc1garbage"],
                [b"r2"],
                [b"r3", b"a", b"b", b"c"],
                [b"r4", b"\x00" * (request_frame_limit(t.cfg) + 1)],
            )
        ]
    finally:
        sock.close()
    rejected = sum(a is not None and P.decode(a[-1]).status == "rejected" for a in answers if a)
    alive = _buffer_alive(t, pid)
    return (
        alive and rejected >= 3,
        f"{rejected}/4 answered rejected; buffer "
        f"{'alive, same process' if alive else 'DOWN or restarted'}",
    )


def nested_frame(t: Target) -> tuple[bool, str]:
    """Issue 42 item 8: a map whose value nests lists 50,000 deep, from a member."""
    pid, sock = t.buffer_pid(), _raw_member(t)
    try:
        answer = _ask_raw(sock, [b"n1", b"\x81\xa4type" + b"\x91" * NESTED_DEPTH + b"\xc0"])
    finally:
        sock.close()
    alive = _buffer_alive(t, pid)
    said = P.decode(answer[-1]).reason[:40] if answer else "no answer"
    return (
        alive and answer is not None,
        f"answer: {said!r}; buffer {'alive' if alive else 'DOWN or restarted'}",
    )


def curve_replay(t: Target) -> tuple[bool, str]:
    """A member's CURVE session recorded on the wire (a relay on loopback) and sent again on a new
    connection: the handshake cannot be replayed, so the recorded requests never run twice."""
    relay = _Relay(int(t.address.rsplit(":", 1)[1]))
    try:
        # its CURVE handshake and a request, through the relay
        client = Client(f"tcp://127.0.0.1:{relay.port}", keys=t.trainer, timeout_s=REQUEST_S)
        answered = isinstance(client.request(P.RosterRequest()), P.Roster)
        client.close()
        before = t.stats()
        relay.replay()
        time.sleep(1.0)  # the buffer refuses the replayed handshake within its loop
        after = t.stats()
    finally:
        relay.close()
    refused = after.get("auth_refused_handshake", 0) - before.get("auth_refused_handshake", 0)
    return (
        answered and refused >= 1,
        f"{len(relay.recorded)} bytes of a live session replayed; handshake refused {refused}x, "
        "so no recorded request ran again",
    )


class _Relay:
    """A TCP relay on loopback that records what the client sends, for ``replay``."""

    def __init__(self, upstream: int):
        self.upstream, self.recorded, self.socks = upstream, bytearray(), []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            down, _ = self.server.accept()
        except OSError:
            return
        up = socket.create_connection(("127.0.0.1", self.upstream))
        self.socks += [down, up]
        threading.Thread(target=self._pipe, args=(down, up, True), daemon=True).start()
        threading.Thread(target=self._pipe, args=(up, down, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while chunk := src.recv(65536):
                if record:
                    self.recorded += chunk
                dst.sendall(chunk)
        except OSError:
            pass

    def replay(self) -> None:
        with socket.create_connection(("127.0.0.1", self.upstream), timeout=5) as s:
            s.sendall(bytes(self.recorded))
            time.sleep(0.5)

    def close(self) -> None:
        for s in [self.server, *self.socks]:
            s.close()


def slow_http(t: Target) -> tuple[bool, str]:
    """Slow, malformed and oversized HTTP with the valid engine key: a request line of garbage, a
    header past the limit, a body that is not JSON, a body declared at 1 GiB, and a head trickled a
    byte every half second."""
    url = t.engines[0]
    port, auth = (
        int(url.rsplit(":", 1)[1]),
        f"Host: x\r\nAuthorization: Bearer {t.engine_key}\r\n".encode(),
    )
    outcomes = [
        _ask_http(port, b"GARBAGE\r\n" + auth + b"\r\n"),
        _ask_http(port, b"GET /health HTTP/1.1\r\n" + auth + b"X: " + b"a" * 20000 + b"\r\n\r\n"),
        _ask_http(port, b"POST /generate HTTP/1.1\r\n" + auth + b"Content-Length: 5\r\n\r\n{{{{{"),
        _ask_http(
            port, b"POST /generate HTTP/1.1\r\n" + auth + b"Content-Length: 1073741824\r\n\r\n"
        ),
    ]
    t0, cut = time.monotonic(), False
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            for byte in b"GET /health HTTP/1.1\r\n" + auth:
                s.sendall(bytes([byte]))
                time.sleep(0.5)
                if time.monotonic() - t0 > 30:
                    break
        except OSError:
            cut = True
        cut = cut or _closed(s)
    req = urllib.request.Request(
        url + "/model_info", headers={"Authorization": f"Bearer {t.engine_key}"}
    )
    after = urllib.request.urlopen(req, timeout=10).status
    ok = all(o.startswith(("400", "413", "431")) for o in outcomes) and cut and after == 200
    return (
        ok,
        f"answers {outcomes}; trickled head cut after {time.monotonic() - t0:.0f}s: {cut}; "
        f"engine then answered {after}",
    )


def _ask_http(port: int, raw: bytes) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        try:
            head = s.recv(4096)
        except OSError:
            return "reset"
    return head.split(b" ", 2)[1].decode() if head.startswith(b"HTTP/") else f"{head[:20]!r}"


def _closed(s: socket.socket) -> bool:
    s.settimeout(1.0)
    try:
        return s.recv(1) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


def nan_group(t: Target) -> tuple[bool, str]:
    """Issue 42 item 1: a group whose behaviour log-probs hold NaN and -inf, on a real lease (under
    the trainer's key: the flood above spent the rollout key's allowance of server ids)."""
    sid = f"nan-{os.getpid()}"
    client = Client(t.address, keys=t.trainer, timeout_s=REQUEST_S, identity=sid)
    try:
        client.request(P.Register(server_id=sid, engine_url="http://127.0.0.1:9"))
        credit, version, why = _credit(client, sid)
        if credit is None:
            return False, f"no credit granted to send it on ({why})"
        ack = client.request(_nan_group(sid, credit, version, t.cfg.task.group_size))
    finally:
        client.close()
    return ack.status == "rejected", f"the buffer answered {ack.status} {ack.reason[:60]!r}"


def _credit(client: Client, sid: str, within_s: float = 60.0) -> tuple[P.Credit | None, int, str]:
    """A lease for ``sid`` and the version its engine claims: it claims the trainer's version each
    time (credits go to current engines only) and asks as often as a round trip allows, since the
    job's own servers take every slot the admission window opens."""
    version, why, deadline = 0, "", time.monotonic() + within_s
    while time.monotonic() < deadline:
        hb = client.request(P.Heartbeat(server_id=sid, policy_version=version))
        version = hb.policy_version if isinstance(hb, P.HeartbeatAck) else version  # the next claim
        reply = client.request(P.CreditRequest(server_id=sid, max_credits=1))
        if reply.credits:
            return reply.credits[0], version, ""
        why = reply.reason
    return None, version, why


def _nan_group(sid: str, c: P.Credit, version: int, size: int) -> P.TrajectoryGroup:
    logp = as_f32([np.nan, -np.inf, -1.0, -1.0])
    trajs = [
        Trajectory.of(
            prompt_ids=as_i32([5, 6]),
            output_ids=as_i32([1, 2, 3, 4]),
            behav_logp=logp,
            versions=as_i32(np.full(4, version)),
            reward=float(i % 2),
            finish_reason="stop",
        )
        for i in range(size)
    ]
    return P.TrajectoryGroup(
        group_id=f"{sid}-g",
        server_id=sid,
        lease_id=c.lease_id,
        prompt_index=c.prompt_index,
        epoch=c.epoch,
        trajectories=trajs,
    )


class _Planted:
    """Unpickled, it leaves a file behind: proof that loading ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def checkpoint_pickle(t: Target) -> tuple[bool, str]:
    """Issue 42 item 7: a checkpoint of the job's model whose meta.pt runs code when loaded."""
    import torch
    import torch.distributed as dist

    from areal_like.net.distributed import free_port
    from trainer.checkpoint import load_checkpoint, save_checkpoint
    from trainer.model import build_policy

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        return _plant_and_load(t, torch, build_policy, save_checkpoint, load_checkpoint)
    finally:
        dist.destroy_process_group()


def _plant_and_load(t: Target, torch, build_policy, save_checkpoint, load_checkpoint):
    policy = build_policy(t.cfg.model, t.cfg.trainer)
    with tempfile.TemporaryDirectory() as tmp:
        path, marker = save_checkpoint(Path(tmp) / "ckpt", policy, 1), Path(tmp) / "code-ran"
        meta = torch.load(path / "meta.pt", weights_only=False)  # our own file, just written
        torch.save({**meta, "planted": _Planted(str(marker))}, path / "meta.pt")
        try:
            load_checkpoint(path, policy)
            why = "loaded"
        except (pickle.UnpicklingError, RuntimeError) as e:
            why = f"refused ({type(e).__name__})"
        ran = marker.exists()
    return not ran, f"{why}; planted code {'RAN' if ran else 'did not run'}"


def roster_read(t: Target) -> tuple[bool, str]:
    """The rollout key asks for the roster (each server's engine URL, sync URL and incarnation:
    what a hijack of its id needs) from 10 fresh sockets."""
    replies = [t.fresh(P.RosterRequest()) for _ in range(10)]
    read = sum(isinstance(r, P.Roster) for r in replies)
    refused = sum(isinstance(r, P.Ack) and r.reason.startswith("role") for r in replies)
    return read == 0, f"{refused}/10 refused for their role, {read} rosters read"


def roster_hijack(t: Target) -> tuple[bool, str]:
    """A real server's id registered again with the attacker's URLs, under its own incarnation
    (as if it had leaked) and under a new one: the entry must stay the real server's, and the job
    must go on training (before, the push hung on the fake engine and training fell to a step in
    20 s)."""
    from launch.records import step_records

    real = t.roster()[0]
    replies = [t.fresh(P.Register(server_id=real.server_id, engine_url="http://127.0.0.1:9",
                                  sync_url="http://127.0.0.1:9", policy_version=real.policy_version,
                                  incarnation=incarnation, engine_kind=real.engine_kind))
               for incarnation in (real.incarnation, "f" * 16)]
    refused = sum(isinstance(r, P.Ack) and r.reason.startswith("id_in_use") for r in replies)
    now = next((m for m in t.roster() if m.server_id == real.server_id), None)
    kept = now is not None and (now.engine_url, now.incarnation) == (real.engine_url,
                                                                     real.incarnation)
    before, deadline = len(step_records(t.run_dir)), time.monotonic() + 90
    while len(step_records(t.run_dir)) < before + 2 and time.monotonic() < deadline:
        time.sleep(1.0)
    steps = len(step_records(t.run_dir)) - before
    return (refused == 2 and kept and steps >= 2,
            f"{refused}/2 refused, entry {'kept' if kept else 'REPLACED'}, {steps} steps after")


def job_alive(t: Target) -> tuple[bool, str]:
    """After everything: the job still trains (its step count moves) and every daemon is up."""
    from launch.records import step_records

    before = len(step_records(t.run_dir))
    deadline = time.monotonic() + 90
    while len(step_records(t.run_dir)) <= before and time.monotonic() < deadline:
        time.sleep(1.0)
    after = len(step_records(t.run_dir))
    down = [name for name, pid in t.sup.pids().items() if pid is None]
    return (
        after > before and not down,
        f"steps {before} -> {after} in the last check; down: {down or 'none'}",
    )


RAY_STEAL = """import sys, ray
ray.init(address=sys.argv[1])
steal = ray.remote(lambda path: open(path).read())
print("STOLEN", ray.get(steal.remote(sys.argv[2]), timeout=60))
"""


def _ray_head(root: Path) -> tuple[subprocess.Popen, str, str, dict[str, str], str]:
    """One Ray node started as launch/RAY.md says (``RAY_AUTH_MODE=token``, a token made for it in
    a 0600 file, the dashboard on loopback), ports picked free above Ray's worker range: (its
    ``ray start --block``, GCS address, dashboard URL, a client's auth environment, the token)."""
    from areal_like.net.distributed import free_port

    def port() -> int:
        return next(p for p in iter(free_port, 0) if p >= 20000)

    token, token_file = os.urandom(32).hex(), root / "auth_token"
    token_file.touch(mode=0o600)
    token_file.write_text(token)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    gcs, dashboard = port(), port()
    ray = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [ray, "start", "--head", f"--port={gcs}", f"--temp-dir={root / 'ray'}", "--num-cpus=1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={port()}", f"--dashboard-agent-listen-port={port()}",
         "--object-store-memory=100000000", "--disable-usage-stats", "--block"],
        env={**os.environ, **auth}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    return head, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", auth, token


def _ray_driver(address: str, key_file: Path, auth: dict[str, str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
    return subprocess.Popen([sys.executable, "-c", RAY_STEAL, address, str(key_file)],
                            env={**env, **auth}, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


def _ray_submit(dashboard: str, entrypoint: str) -> int:
    """Ray's job submission REST API, with no credential: the HTTP status (0: no answer)."""
    req = urllib.request.Request(f"{dashboard}/api/jobs/", method="POST",
                                 data=json.dumps({"entrypoint": entrypoint}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_S) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def ray_keyless(t: Target) -> tuple[bool, str]:
    """A stranger who reaches a Ray cluster started as launch/RAY.md says, without its token:
    a driver on the GCS port runs a task that reads the job's engine key, and the jobs API on the
    dashboard port takes a command that copies it. The cluster's owner, with the token, runs the
    same task (the cluster serves: the stranger's failure is the token's doing)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return True, "Ray is not installed here: no Ray port to reach"
    key_file = t.run_dir / "secrets" / "engine_api_key"
    with tempfile.TemporaryDirectory(prefix="al-ray-") as tmp:
        head, address, dashboard, auth, _ = _ray_head(Path(tmp))
        drivers = [_ray_driver(address, key_file, {})]  # the stranger's, then the owner's
        try:
            deadline, status = time.monotonic() + 90, 0
            while status == 0 and time.monotonic() < deadline and head.poll() is None:
                status = _ray_submit(dashboard, f"cp {key_file} {tmp}/stolen")
                time.sleep(0.5 if status == 0 else 0)
            out, _ = drivers[0].communicate(timeout=90)
            task_stolen = t.engine_key in out
            drivers.append(_ray_driver(address, key_file, auth))
            owner, _ = drivers[1].communicate(timeout=90)
        finally:
            for pid in (*(d.pid for d in drivers), head.pid):
                _kill_ray_tree(pid)
        job_taken = status not in (401, 403) or Path(tmp, "stolen").exists()
    serves = t.engine_key in owner
    return (serves and not task_stolen and not job_taken,
            f"keyless task {'STOLE the engine key' if task_stolen else 'refused'}; keyless job "
            f"submission HTTP {status}; the owner's task with the token "
            f"{'ran' if serves else 'did NOT run (the cluster is not serving)'}")


def _kill_ray_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process under it, by PID."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.Error:
        return
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=30)


class _FakeMember(http.server.BaseHTTPRequestHandler):
    """A member's engine and sync port in one, on 127.0.0.1: ``/health`` answers ``health_bytes``
    (made as sent, no ``Content-Length``), every other call 409 with ``error`` as its message."""

    protocol_version = "HTTP/1.0"
    health_bytes, error, seen = 0, "", None  # set per server (``_fake_member``)

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.server.seen.append(self.path)
        self.send_response(200)
        self.end_headers()
        chunk, sent = b"x" * (1 << 20), 0
        try:
            while sent < self.server.health_bytes:
                self.wfile.write(chunk)
                sent += len(chunk)
        except OSError:  # the trainer stopped reading: what it should do
            pass
        self.server.sent.append(sent)

    def do_POST(self) -> None:
        self.server.seen.append(self.path)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"error": {"message": self.server.error}}).encode()
        self.send_response(409)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _fake_member(t: Target, health_bytes: int, error: str, probes: int,
                 within_s: float = 90.0) -> tuple[list[str], list[int], int]:
    """Register a fake member (the rollout key) whose engine and sync port are ``_FakeMember``
    servers (two: each URL gets a client of its own), again under a fresh incarnation after each
    ``/health`` probe (a lost member is left out of the syncs until it registers as a new
    process), until ``probes`` probes or ``within_s``; heartbeat meanwhile. The paths the trainer
    called, the bytes each ``/health`` answer got out before the trainer stopped reading, and
    trainer rank 0's peak RSS growth (bytes) meanwhile."""
    seen, sent, servers = [], [], []
    for _ in range(2):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeMember)
        server.daemon_threads, server.health_bytes, server.error = True, health_bytes, error
        server.seen, server.sent = seen, sent
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    url, port = (f"http://127.0.0.1:{s.server_address[1]}" for s in servers)
    sid = f"fake-{os.getpid()}"
    trainer = psutil.Process(t.sup.pids()["trainer"])
    base = peak = trainer.memory_info().rss
    client = Client(t.address, keys=t.rollout, timeout_s=REQUEST_S, identity=sid)
    deadline, registered = time.monotonic() + within_s, -1
    try:
        while len(sent) < probes and time.monotonic() < deadline:
            if registered < len(sent):  # probed (or never registered): a new process
                version = t.observer.request(P.RosterRequest()).policy_version
                ack = client.request(P.Register(
                    server_id=sid, engine_url=url, sync_url=port, policy_version=version,
                    incarnation=secrets.token_hex(8), engine_kind="embedded"))
                registered = len(sent) if isinstance(ack, P.RegisterAck) else registered
            client.request(P.Heartbeat(server_id=sid, policy_version=version))
            peak = max(peak, trainer.memory_info().rss)
            time.sleep(0.2)
        peak = max(peak, trainer.memory_info().rss)
    finally:
        client.close()
        for server in servers:
            server.shutdown()
            server.server_close()
    return seen, sent, peak - base


def huge_health(t: Target) -> tuple[bool, str]:
    """A member (the rollout key) registers URLs whose ``/begin`` fails and whose ``/health``
    answers 1 GiB: after each failed sync trainer rank 0 probes that ``/health``. Five probes."""
    seen, sent, growth = _fake_member(t, 1 << 30, "busy", probes=5)
    most = max(sent, default=0)
    return (
        bool(sent) and growth < 128 << 20 and most < 64 << 20,
        f"{len(sent)} /health probes, each fed up to {most >> 20} MiB before the trainer stopped "
        f"reading; trainer RSS peak +{growth >> 20} MiB",
    )


def log_forging(t: Target) -> tuple[bool, str]:
    """A member's sync port answers ``/begin`` with an error whose text holds log lines of its
    own: none of them may start a line of trainer.log."""
    marker, head = f"FORGED-{secrets.token_hex(4)}", "00:00:00 ERROR [trainer pid=1]"
    error = "busy" + "".join(f"\n{head} trainer.loop: {marker} {i}" for i in range(4))
    seen, sent, _ = _fake_member(t, 0, error, probes=2)
    log_dir = t.run_dir / "logs"
    text = "".join(p.read_text(errors="replace") for p in log_dir.glob("trainer*.log*"))
    forged = sum(line.startswith(head) and marker in line for line in text.splitlines())
    logged = sum(marker in line for line in text.splitlines())
    return (
        bool(sent) and logged > 0 and forged == 0,
        f"{seen.count('/begin')} /begin refusals carried 4 forged lines each; trainer.log: "
        f"{logged} lines name them, {forged} forged lines",
    )


ATTACKS = [
    ("batch_theft", batch_theft),
    ("register_flood", register_flood),
    ("roster_read", roster_read),
    ("roster_hijack", roster_hijack),
    ("metrics_strangers", metrics_strangers),
    ("engine_lockout", engine_lockout),
    ("worker_secrets", worker_secrets),
    ("malformed_frames", malformed_frames),
    ("curve_replay", curve_replay),
    ("nested_frame", nested_frame),
    ("slow_http_with_key", slow_http),
    ("huge_health", huge_health),
    ("log_forging", log_forging),
    ("job_still_trains", job_alive),
    ("nan_group", nan_group),
    ("checkpoint_pickle", checkpoint_pickle),
    ("ray_keyless_client", ray_keyless),
]
