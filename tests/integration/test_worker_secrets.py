"""Reward, tool and agent code cannot read the job's keys, signal its processes, act as root or
reach host controls, others' files, the network or the weight-sync store (real sandbox workers)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from areal_like.net import security
from areal_like.net.auth import ensure_key_file
from areal_like.settings.config import TaskConfig
from areal_like.tasks.datasets import Example
from benchmarks.sandbox_call import run_sandboxed
from rollout_server import sandbox
from rollout_server.reward_pool import RewardPool
from rollout_server.sandbox import SandboxLimits

ATTACK = '''
import json, os, signal


def attack(run_dir, parent_pid, plant=None):
    """Everything it reached, by name."""
    got = {}
    if plant:  # a file beside the job's own code (outside /tmp): run as root at the next start
        try:
            with open(plant, "w") as f:
                f.write("raise SystemExit('planted')")
            got["wrote code"] = True
        except OSError:
            pass
    for rel in ("secrets/engine_api_key", "keys/server.key_secret",
                "keys/clients/trainer.key_secret", "keys/clients/rollout.key_secret"):
        try:
            with open(os.path.join(run_dir, rel)) as f:
                got[rel] = f.read()[:8]
        except OSError:
            pass
    for rel in ("secrets", "keys", "keys/clients"):
        try:
            if os.listdir(os.path.join(run_dir, rel)):
                got["ls " + rel] = True
        except OSError:
            pass
    for what in ("cmdline", "environ"):
        try:
            with open(f"/proc/{parent_pid}/{what}", "rb") as f:
                got["/proc " + what] = len(f.read())
        except OSError:
            pass
    for sig in (0, signal.SIGUSR1):
        try:
            os.kill(parent_pid, sig)
            got[f"signal {int(sig)}"] = True
        except OSError:
            pass
    return got


def reward(response, example):
    return float(len(attack(example.answer, int(response))))
'''


@pytest.fixture
def job(tmp_path, monkeypatch):
    """A run directory with the job's keys and engine API key, and the attack importable."""
    run_dir = tmp_path / "run"
    security.make_keys(run_dir / "keys")
    ensure_key_file(run_dir)
    (tmp_path / "attack_fns.py").write_text(textwrap.dedent(ATTACK))
    tmp_path.chmod(0o755)  # pytest makes it 0700: root's workers run as a uid of their own
    monkeypatch.syspath_prepend(str(tmp_path))
    usr1 = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: usr1.append(1))
    try:
        yield run_dir, usr1
    finally:
        signal.signal(signal.SIGUSR1, previous)
        sandbox.hide(None)


ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0 or sys.platform != "linux",
                               reason="hiding needs root on Linux")


@ROOT_ONLY
def test_a_sandboxed_call_or_a_reward_in_the_pool_reaches_no_key_and_signals_no_process(job):
    run_dir, usr1 = job
    sys.modules.pop("attack_fns", None)
    from attack_fns import attack  # what it reaches where nothing stops it: this process

    here = attack(str(run_dir), os.getpid())
    assert "keys/clients/trainer.key_secret" in here and usr1 == [1]
    plant = Path(sandbox.__file__).with_name(f"_planted_{os.getpid()}.py")
    assert sandbox.hide([run_dir / "keys", run_dir / "secrets"])  # as the rollout server at start
    try:
        got = run_sandboxed("attack_fns:attack", (str(run_dir), os.getpid(), str(plant)),
                            SandboxLimits(timeout_s=30))
        assert got.ok and got.value == {} and not plant.exists(), got
    finally:
        plant.unlink(missing_ok=True)
    pool = RewardPool(TaskConfig(reward_timeout_s=30.0, reward_workers=1), "attack_fns:reward")
    try:
        got = asyncio.run(pool.score_group("q", [str(os.getpid())], Example("q", str(run_dir))))
    finally:
        pool.close()
    assert got == [(0.0, None)]  # nothing reached
    assert usr1 == [1]  # only this process's own signal came through


PROBES = '''
import os, socket

# host-wide controls that Linux guards by file mode alone for uid 0: opened for writing and closed
# at once, never written
CONTROLS = ("/proc/sysrq-trigger", "/proc/sys/kernel/core_pattern", "/proc/sys/kernel/modprobe",
            "/proc/sys/vm/drop_caches", "/sys/kernel/uevent_helper", "/sys/power/state")


def identity():
    return {"uids": os.getresuid(), "gids": os.getresgid(), "groups": os.getgroups()}


def controls():
    """Each control this code could open for writing (none may be)."""
    opened = []
    for path in CONTROLS:
        try:
            fd = os.open(path, os.O_WRONLY)
        except OSError:
            continue
        os.close(fd)  # never written
        opened.append(path)
    read_only = {p: bool(os.statvfs(p).f_flag & os.ST_RDONLY)
                 for p in ("/proc", "/proc/sys", "/sys", "/dev", "/tmp", "/dev/shm")}
    return {"opened": opened, "read_only": read_only}


def files(host_marks, code_dir, name):
    """What it sees of the host's /tmp and /dev/shm, and where it could write."""
    got = {"sees": [p for p in host_marks if os.path.exists(p)], "wrote": []}
    for path in (os.path.join(code_dir, name), os.path.join("/tmp", name),
                 os.path.join("/dev/shm", name)):
        try:
            with open(path, "w") as f:
                f.write("planted")
            got["wrote"].append(path)
        except OSError:
            pass
    return got


def agent(base_url, api_key, example):
    """An agent that tries its endpoint (``base_url``) and another loopback port (``example``):
    10 for the endpoint's answer, 1 for the other's."""
    from urllib.parse import urlsplit

    got = connect(urlsplit(base_url).port).get("answer") == "hello"
    return 10 * got + (connect(example).get("answer") == "hello")


def connect(port, send=b""):
    """The first bytes the listener on loopback ``port`` answers, or why it could not connect."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(send)
            conn.settimeout(10)
            return {"answer": conn.recv(64).decode(errors="replace")}
    except OSError as e:
        return {"error": type(e).__name__}
'''


@pytest.fixture
def probes(tmp_path, monkeypatch):
    """``PROBES`` importable by workers: a directory others may read (pytest makes 0700 ones)."""
    code = tmp_path / "code"
    code.mkdir(mode=0o755)
    (code / "sandbox_probes.py").write_text(PROBES)
    monkeypatch.syspath_prepend(str(code))
    return code


def probe(name: str, *args, network: bool = False):
    limits = SandboxLimits(timeout_s=30, network=True) if network else SandboxLimits(timeout_s=30)
    got = run_sandboxed(f"sandbox_probes:{name}", args, limits)
    assert got.ok, got
    return got.value


@ROOT_ONLY
def test_a_worker_is_no_root_id_opens_no_host_control_and_owns_its_tmp_and_shm(probes):
    ids = probe("identity")
    uid = ids["uids"][0]
    assert uid != 0 and ids == {"uids": [uid] * 3, "gids": [uid] * 3, "groups": []}, ids
    got = probe("controls")
    assert got["opened"] == [], got
    assert got["read_only"] == {"/proc": True, "/proc/sys": True, "/sys": True, "/dev": True,
                                "/tmp": False, "/dev/shm": False}, got
    name = f"areal-sandbox-test-{os.getpid()}"
    marks = [Path("/tmp") / name, Path("/dev/shm") / name]  # the host's, made by this test
    try:
        for mark in marks:
            mark.write_text("the host's")
        got = probe("files", [str(m) for m in marks], str(probes), name)
        assert got == {"sees": [], "wrote": [f"/tmp/{name}", f"/dev/shm/{name}"]}, got
        assert [m.read_text() for m in marks] == ["the host's"] * 2  # not the worker's files
        assert not (probes / name).exists()
    finally:
        for mark in marks:
            mark.unlink(missing_ok=True)


@contextlib.contextmanager
def answering():
    """A loopback server that answers each connection ``b"hello"``; yields its port."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"hello")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)  # wakes the accept
        server.close()
        thread.join(timeout=10)


@pytest.fixture
def listener():
    with answering() as port:
        yield port


@ROOT_ONLY
@pytest.mark.parametrize("network", [False, True])
def test_sandboxed_code_gets_no_network_nor_a_store_gate_door(probes, listener, network):
    """No network unless the task asks (task.worker_network); even then a door admits its own
    user's connections (uid 0, the job's) and a worker is not it."""
    from areal_like.net.store_gate import StoreDoor, StoreGate

    reached = probe("connect", listener, network=network)  # ENETUNREACH: no interface up
    assert reached == ({"answer": "hello"} if network else {"error": "OSError"}), reached

    # the "store": says hello
    gate = StoreGate("127.0.0.1", 0, "group-name", listener, key="the-jobs-engine-key")
    door = StoreDoor("127.0.0.1", gate.port, "group-name", key="the-jobs-engine-key")
    try:
        ours = socket.create_connection(("127.0.0.1", door.port), timeout=10)
        with ours:  # the job's own client gets through
            ours.sendall(b"\x00")
            ours.settimeout(10)
            assert ours.recv(5) == b"hello"
        got = probe("connect", door.port, b"\x00", network=network)
        if network:  # it connects, and the door closes it unanswered (EOF, or a reset)
            assert got in ({"answer": ""}, {"error": "ConnectionResetError"}), got
        else:  # it cannot even connect
            assert got == {"error": "OSError"}, got
        assert door.refused == (1 if network else 0) and gate.refused == 0
    finally:
        door.close()
        gate.close()


@ROOT_ONLY
def test_an_agent_worker_reaches_its_endpoint_and_nothing_else(probes, listener):
    """Agent workers get loopback alone, where their endpoint is relayed."""
    from rollout_server.agent_episode import RUN
    from rollout_server.tool_pool import ToolPool

    with answering() as other:  # another loopback port: an engine's, a store's
        pool = ToolPool(workers=1, timeout_s=30.0, processes=8, endpoint=True)  # as agent_pool
        try:
            pool.forward_to("127.0.0.1", listener)
            got = asyncio.run(pool.call(RUN, {
                "path": "sandbox_probes:agent", "api_key": "k", "example": other,
                "base_url": f"http://127.0.0.1:{listener}/v1", "relay": pool.relay}))
        finally:
            pool.close()
    assert (got.outcome, got.content) == ("ok", "10"), got
