"""Weight sync on CPU to one real engine (buffer, embedded engine, Driver) shared by the module;
each test runs its own world-size-1 trainer (tests/weight_pusher.py) with versions of its own."""

from __future__ import annotations

import asyncio
import base64
import pickle
import socket
import threading

import pytest
from weight_sync_harness import Pusher, engine_at, module_system

from areal_like.net.dealer import Client
from areal_like.wire import protocol as P

REPORT_WAIT_S = 120.0  # an upper bound for a loaded 2-core machine, not a timing assert
STARTUP_S = 180.0
A = "rollout-a"


# no expiry: a test's fake member leaves by its last Heartbeat
system, settled = module_system("one_engine", ["buffer.heartbeat_timeout_s=600"], [A])


# name -> (trainer overrides, (path, overlapped) per push); six 0.25 MB buckets: too many to overlap
SEQUENCES = {"overlap-distributed": ([], [("distributed", True)] * 3),
             "overlap-tensor": ([], [("tensor", True)] * 3),
             "tensor-disk-tensor": (["trainer.weight_sync.bucket_mb=0.25"],
                                    [("tensor", False), ("disk", False), ("tensor", False)])}


@pytest.mark.parametrize("name", SEQUENCES)
def test_each_push_loads_the_weights_at_push_time(name, system, tmp_path, spawn_python,
                                                  wait_until):
    """Each version served with the exact weights pushed (SHA-256), not the ones moved after."""
    overrides, paths = SEQUENCES[name]
    versions = system.versions(len(paths))
    pusher = Pusher(spawn_python, system, tmp_path, [
        {"version": v, "members": 1, "path": path, "overlap": overlap,
         **({"after": f"checked{v - 1}"} if i else {})}  # each after the test read the engine
        for i, (v, (path, overlap)) in enumerate(zip(versions, paths))],
        ["trainer.weight_sync.deadline_s=60", *overrides])
    shas = {}
    for i, (v, (path, overlap)) in enumerate(zip(versions, paths)):
        rep = pusher.report(f"v{v}.json", STARTUP_S + REPORT_WAIT_S)
        shas[v] = rep["sha"]
        if i or not overlap:  # an overlapped push returns the previous one's report
            assert rep["version"] == v - overlap and rep["overlapped"] == overlap, rep
            assert rep["done"] == [A] and not rep["dropped"] and not rep["error"], rep
            assert rep["reform"] == (overlap and i == 1 and path == "distributed"), rep
        got = wait_until(lambda v=v: engine_at(system.root, A, v), REPORT_WAIT_S, 0.1,
                         f"engine at v{v}")
        assert got["sha"] == shas[v], (v, path, got, rep)
        (tmp_path / f"checked{v}").write_text("ok")
    if overlap:
        last = pusher.report("last.json", REPORT_WAIT_S)
        assert last["version"] == v and last["done"] == [A] and not last["reform"], last
    assert len(set(shas.values())) == len(paths)
    pusher.exited()


class FakeMember(threading.Thread):
    """Registers server_id with engine_url (also its sync URL), heartbeats, then leaves."""

    def __init__(self, address: str, server_id: str, engine_url: str):
        super().__init__(daemon=True, name=f"fake-{server_id}")
        self.address, self.server_id, self.engine_url = address, server_id, engine_url
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        client = Client(self.address, timeout_s=30)
        try:
            client.request(P.Register(server_id=self.server_id, engine_url=self.engine_url,
                                      sync_url=self.engine_url, policy_version=0, fresh=True))
            while not self.stop.wait(0.2):
                client.request(P.Heartbeat(server_id=self.server_id, policy_version=0))
            client.request(P.Heartbeat(server_id=self.server_id, policy_version=0, leaving=True))
        except BaseException as e:  # surfaced by the test
            self.error = e
        finally:
            client.close()


@pytest.mark.parametrize("engine", ["refused", "silent"])
def test_a_member_without_an_engine_does_not_hold_up_every_sync(engine, system, tmp_path,
                                                                spawn_python, free_port,
                                                                wait_until):
    """A fake member's URL refuses (fails at once) or never answers (may hold up v1 only)."""
    deadline_s = 20.0
    # silent: the kernel completes the connections (the backlog), nobody reads or answers them
    hole = socket.create_server(("127.0.0.1", 0), backlog=128) if engine == "silent" else None
    fake = FakeMember(system.cfg.buffer.address, "fake-1", f"http://127.0.0.1:"
                      f"{hole.getsockname()[1] if hole else free_port()}")  # refused: no listener
    fake.start()
    versions = system.versions(3)
    pusher = Pusher(spawn_python, system, tmp_path, [{"version": v, "members": 2}
                                                     for v in versions],
                    [f"trainer.weight_sync.deadline_s={deadline_s}",
                     "trainer.weight_sync.bucket_mb=1.0"], drivers=[fake])
    try:
        for v in versions:
            rep = pusher.report(f"v{v}.json", (STARTUP_S if v == versions[0] else 0)
                                + deadline_s + REPORT_WAIT_S)
            # whether a later push still names the fake is the trainer's choice; it never loads
            assert A in rep["members"] and "fake-1" not in rep["done"], rep
            if v > versions[0] or engine == "refused":  # the silent one may hold up v1, once
                assert rep["done"] == [A] and not rep["cut"], rep
        served = wait_until(lambda: engine_at(system.root, A, v), 30, 0.1, f"the engine at v{v}")
        assert served["sha"] == rep["sha"]  # exactly the trainer's weights
        pusher.exited()
    finally:
        fake.stop.set()
        fake.join(timeout=15)
        if hole is not None:
            hole.close()


def _global(module: str, name: str) -> bytes:
    """Pickle opcodes pushing module.name (protocol 4: a dotted name is an attribute path)."""
    return b"".join(pickle.SHORT_BINUNICODE + bytes([len(w)]) + w.encode()
                    for w in (module, name)) + pickle.STACK_GLOBAL


def _text(s: str) -> bytes:
    return pickle.BINUNICODE + len(s.encode()).to_bytes(4, "little") + s.encode()


def _call(fn: bytes, *args: bytes) -> bytes:
    return fn + pickle.MARK + b"".join(args) + pickle.TUPLE + pickle.REDUCE


def _payload(obj: bytes) -> str:
    """``[("model.norm.weight", obj)]`` as a base64 payload."""
    return base64.b64encode(pickle.PROTO + b"\x04" + pickle.MARK + pickle.MARK
                            + _text("model.norm.weight") + obj + pickle.TUPLE + pickle.LIST
                            + pickle.STOP).decode()


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_engine_refuses_payloads_it_must_not_unpickle_or_cannot_read(system, tmp_path):
    """Payloads reaching os.system/eval/__reduce__, bad formats, empty ones: 400, nothing run."""
    from areal_like.engines.client import EngineError
    from areal_like.engines.sglang import SGLangClient

    async def post(payloads, load_format=None) -> str:
        async with SGLangClient(system.urls[A], timeout_s=30) as sg:
            before = await sg.weight_version()
            with pytest.raises(EngineError) as e:
                await sg.update_weights_from_tensor(payloads, load_format=load_format,
                                                    weight_version="999999")
            assert e.value.status == 400, e.value
            assert await sg.weight_version() == before  # nothing was loaded
            return e.value.message

    marker = tmp_path / "ran"
    cmd = _text(f"touch {marker}")
    payloads = [  # (the name refused first, the object)
        ("torch.os.system", _call(_global("torch", "os.system"), cmd)),
        ("builtins.getattr", _call(_call(_global("builtins", "getattr"), _global("torch", "os"),
                                         _text("system")), cmd)),
        ("torch.os", _call(_global("torch", "os"), cmd)),
        ("builtins.getattr", _call(_call(_global("builtins", "getattr"),
                                         _global("torch", "Tensor"), _text("__init__")), cmd)),
        ("builtins.eval", _call(_global("builtins", "eval"),
                                _text(f"__import__('os').system('touch {marker}')"))),
        ("torch._utils._rebuild_parameter", _call(_global("torch._utils", "_rebuild_parameter"),
                                                  cmd, cmd, cmd)),
    ]
    for named, obj in payloads:
        message = asyncio.run(post([_payload(obj)]))
        assert not marker.exists(), f"{named}: the payload ran a command"
        assert f"{named} is not allowed" in message, (named, message)
    evil = base64.b64encode(pickle.dumps([("model.norm.weight", _Evil())])).decode()
    assert "builtins.print is not allowed" in asyncio.run(post([evil]))
    assert ("load_format='flattened_bucket' is not supported"
            in asyncio.run(post([evil], "flattened_bucket")))
    assert "serialized_named_tensors is empty" in asyncio.run(post([]))
    assert "cannot decode" in asyncio.run(post(["not base64!"]))
