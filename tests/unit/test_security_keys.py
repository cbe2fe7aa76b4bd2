"""security.py in-process: what setup says and returns, and the errors that name the missing file.

Keys are values: ``setup`` returns them and changes no process state; ``apply`` uses only the keys
it is given (``security`` has no active keys to fall back on)."""

from __future__ import annotations

import logging

import pytest
import zmq

from areal_like.net import security
from areal_like.settings.config import RunConfig, SecurityConfig


def test_curve_off_warns_and_leaves_sockets_plain(tmp_path, caplog):
    cfg = RunConfig(run_dir=str(tmp_path), security=SecurityConfig(curve=False))
    with caplog.at_level(logging.WARNING):
        assert security.setup(cfg, "rollout") is None
        sock = zmq.Context.instance().socket(zmq.DEALER)
        security.apply(sock, None)
        assert sock.getsockopt(zmq.MECHANISM) == zmq.NULL
        sock.close(linger=0)
    assert any(r.levelno == logging.WARNING and "NOT authenticated" in r.getMessage()
               for r in caplog.records)


def test_curve_on_loads_the_role_keys_and_makes_curve_clients(tmp_path):
    security.make_keys(tmp_path / "keys")
    cfg = RunConfig(run_dir=str(tmp_path))  # security.curve is on by default, keys in run_dir/keys
    keys = security.setup(cfg, "trainer")
    assert keys.server_public == security.load(tmp_path / "keys", "server").public
    assert not hasattr(security, "active") and not hasattr(security, "activate")  # no ambient keys
    sock = zmq.Context.instance().socket(zmq.DEALER)
    security.apply(sock, keys)
    assert sock.getsockopt(zmq.MECHANISM) == zmq.CURVE and sock.getsockopt(zmq.CURVE_SERVER) == 0
    sock.close(linger=0)
    router = zmq.Context.instance().socket(zmq.ROUTER)
    # a client holds no server key
    with pytest.raises(security.SecurityError, match="cannot serve CURVE"):
        security.apply(router, keys)
    router.close(linger=0)
    plain = zmq.Context.instance().socket(zmq.DEALER)  # made after setup, given no keys: plain
    security.apply(plain, None)
    assert plain.getsockopt(zmq.MECHANISM) == zmq.NULL
    plain.close(linger=0)


def test_missing_keys_are_named(tmp_path):
    with pytest.raises(security.SecurityError,
                       match=r"server\.key is missing.*areal-like keys RUN_DIR"):
        security.load(tmp_path / "nowhere", "rollout")
    security.make_keys(tmp_path / "keys", clients=("rollout",))
    with pytest.raises(security.SecurityError, match=r"clients/trainer\.key_secret is missing"):
        security.load(tmp_path / "keys", "trainer")
    for public in (tmp_path / "keys" / "clients").glob("*.key"):
        public.unlink()
    # an empty allow-list admits nobody
    with pytest.raises(security.SecurityError, match="no client keys"):
        security.load(tmp_path / "keys", security.SERVER)
    (tmp_path / "keys" / "server.key").write_text("not a certificate")
    with pytest.raises(security.SecurityError, match="not a ZeroMQ certificate"):
        security.load(tmp_path / "keys", "rollout")


def test_a_secret_key_never_shows_in_a_repr(tmp_path):
    security.make_keys(tmp_path / "keys")
    for role in (security.SERVER, "rollout"):
        keys = security.load(tmp_path / "keys", role)
        assert (keys.secret and keys.secret not in repr(keys).encode()
                and repr(keys.secret) not in repr(keys))
        assert keys.public.decode() in repr(keys)  # the public half still identifies it
