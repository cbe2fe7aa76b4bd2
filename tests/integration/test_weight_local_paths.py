"""The one-GPU weight paths on CPU: v1 by tensor (shared memory), v2 from disk, v3 by tensor.

Real buffer, engine, world-size-1 trainer and a stand-in applying plans: after each the engine
serves the version with the trainer's exact weights (SHA-256); no group. Also: unsafe pickles and
unreadable formats are refused with a 400.
"""

from __future__ import annotations

import asyncio
import base64
import pickle

import pytest
from test_trainer_weight_sync import STARTUP_S, read_json
from weight_sync_harness import Driver, engine_at, start_pusher, start_system, write_config

REPORT_WAIT_S = 120.0


def test_tensor_and_disk_paths_load_the_trainers_exact_weights(
        tmp_path, spawn_python, free_port, wait_until):
    cfg, cfg_path = write_config(tmp_path, free_port, ["trainer.weight_sync.deadline_s=30",
                                                       "trainer.weight_sync.bucket_mb=0.25"])
    engines, urls = start_system(tmp_path, spawn_python, wait_until, cfg_path, ["rollout-a"])
    driver = Driver("rollout-a", urls["rollout-a"], cfg)
    driver.start()
    # each after the test read the engine's weights
    pushes = [{"version": 1, "members": 1, "path": "tensor"},
              {"version": 2, "members": 1, "path": "disk", "after": "checked-1"},
              {"version": 3, "members": 1, "path": "tensor", "after": "checked-2"}]
    pusher = start_pusher(spawn_python, cfg_path, tmp_path, pushes)
    try:
        for push in pushes:
            v = push["version"]

            def report(v=v):
                assert pusher.poll() in (None, 0), f"the trainer died (exit {pusher.returncode})"
                assert driver.error is None, driver.error
                return read_json(tmp_path / f"v{v}.json")

            rep = wait_until(report, STARTUP_S + REPORT_WAIT_S, 0.2, f"trainer push v{v}")
            assert rep["done"] == ["rollout-a"] and not rep["dropped"] and not rep["error"], rep
            assert not rep["reform"], rep  # no group
            got = wait_until(lambda v=v: engine_at(tmp_path, "rollout-a", v), 30, 0.1,
                             f"engine at v{v}")
            assert got["sha"] == rep["sha"], (push, got, rep)
            (tmp_path / f"checked-{v}").write_text("")
        assert engines["rollout-a"].poll() is None
    finally:
        driver.stop.set()
        driver.join(timeout=15)


@pytest.fixture
def engine_url(tmp_path, spawn_python, free_port, wait_until):
    _, cfg_path = write_config(tmp_path, free_port, [])
    _, urls = start_system(tmp_path, spawn_python, wait_until, cfg_path, ["rollout-a"])
    return urls["rollout-a"]


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


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


def test_engine_refuses_payloads_it_must_not_unpickle_or_cannot_read(engine_url, tmp_path):
    """Payloads reaching os.system/eval/__reduce__, bad formats, empty ones: 400, nothing run."""
    from areal_like.engines.client import EngineError
    from areal_like.engines.sglang import SGLangClient

    async def post(payloads, load_format=None) -> str:
        async with SGLangClient(engine_url, timeout_s=30) as sg:
            with pytest.raises(EngineError) as e:
                await sg.update_weights_from_tensor(payloads, load_format=load_format,
                                                    weight_version="9")
            assert e.value.status == 400, e.value
            assert await sg.weight_version() == "0"  # nothing was loaded
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
