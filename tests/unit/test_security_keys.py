"""security.py in-process: what setup says and returns, and the errors that name the missing file.

Keys are values: ``setup`` returns them and changes no process state; ``apply`` uses only the keys
it is given (``security`` has no active keys to fall back on)."""

from __future__ import annotations

import logging

import pytest
import zmq

from areal_like.net import security
from areal_like.net.auth import ENGINE_KEY_ENV, KEY_FILE, engine_api_key, ensure_key_file
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


def test_a_secret_key_file_others_may_read_is_refused_naming_the_fix(tmp_path, monkeypatch):
    """As ssh refuses a private key that others may read (a plain ``scp`` leaves a copy 0644): a
    CURVE secret key or the engine API key's file with any group/other bit is refused, naming the
    file and ``chmod 600``; a public key is not checked, and make_keys refuses to keep one."""
    monkeypatch.delenv(ENGINE_KEY_ENV, raising=False)
    keys = tmp_path / "keys"
    security.make_keys(keys)
    (keys / "server.key").chmod(0o644)  # public: fine
    for secret, role, mode in [(keys / "server.key_secret", security.SERVER, 0o644),
                               (keys / "clients" / "rollout.key_secret", "rollout", 0o640)]:
        secret.chmod(mode)
        with pytest.raises(security.SecurityError) as e:
            security.load(keys, role)
        assert str(e.value).endswith(f"chmod 600 {secret}") and f"mode 0{mode:o}" in str(e.value)
        with pytest.raises(security.SecurityError, match="chmod 600"):
            security.make_keys(keys)
        secret.chmod(0o600)
        assert security.load(keys, role).secret
    ensure_key_file(tmp_path)
    (tmp_path / KEY_FILE).chmod(0o604)
    with pytest.raises(security.SecurityError) as e:
        engine_api_key(tmp_path)
    assert str(e.value).endswith(f"chmod 600 {tmp_path / KEY_FILE}"), e.value
