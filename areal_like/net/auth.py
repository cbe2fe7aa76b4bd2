"""A job's HTTP credentials (the engines' API key, the ``/metrics`` bearer token), the HTTP bind
host, and redaction. Where each comes from and who checks it: areal_like/SECURITY.md.

Invariant: credentials are never configuration: they travel in the environment (the engine key
also in ``<run_dir>/secrets/``, mode 0600), so they never reach ``config.yaml`` or a log.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from areal_like.net.security import owner_only

ENGINE_KEY_ENV = "AREAL_LIKE_ENGINE_API_KEY"
METRICS_TOKEN_ENV = "AREAL_LIKE_METRICS_TOKEN"
# the Authorization header of every remote reward request (task.reward_url carries no credential)
REWARD_AUTH_ENV = "AREAL_LIKE_REWARD_AUTH"
BIND_HOST_ENV = "AREAL_LIKE_BIND_HOST"
LOOPBACK = "127.0.0.1"
KEY_FILE = Path("secrets") / "engine_api_key"  # under the run directory
REDACTED = "<redacted>"
# environment variables whose values may be credentials (WANDB_API_KEY, HF_TOKEN, ...):
# broad on purpose
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH", re.IGNORECASE)
# config keys that hold credentials (api_key, admin_api_key, hf_token, password); whole words, so
# max_new_tokens, tokenizer and prompt_key are not among them
SECRET_FIELD = re.compile(r"(^|[_-])(api[_-]?key|token|secret|passw(or)?d|credentials?)($|[_-])",
                          re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(://[^/@:\s]+:)[^/@\s]+@")


def url_credential(url: str) -> str:
    """What in ``url`` is a credential ('' when nothing is): a user or password before its host,
    or a query parameter named like one (``?token=``, ``?api_key=``, ``?key=``, ``?sig=``)."""
    from urllib.parse import parse_qsl, urlsplit

    parts = urlsplit(url)
    if parts.username or parts.password:
        return "a user:password before its host"
    for name, _ in parse_qsl(parts.query, keep_blank_values=True):
        if SECRET_FIELD.search(name) or name.lower() in ("key", "sig", "signature", "auth"):
            return f"the query parameter {name!r}"
    return ""


def engine_api_key(run_dir: str | Path, make: bool = False) -> str | None:
    """The job's engine API key: ``ENGINE_KEY_ENV``, else ``run_dir``'s ``KEY_FILE``; with
    ``make`` (a daemon starting), made there when there is none, by the first of the job's
    processes to start (``ensure_key_file``; `areal-like run` makes it before any starts and hands
    it to other nodes in ``ENGINE_KEY_ENV``)."""
    return os.environ.get(ENGINE_KEY_ENV) or (ensure_key_file(run_dir) if make
                                              else read_key_file(run_dir))


def vouch_proof(key: str, nonce: str, server_id: str, sync_url: str, engine_url: str) -> str:
    """What only a holder of the job's engine key answers to ``nonce``: that rollout server
    ``server_id``'s sync port at ``sync_url`` serves the engine at ``engine_url`` (HMAC-SHA256, its
    own prefix: no other proof of the key signs this message). Trainer rank 0 checks it before it
    sends the key to either URL (rollout_server/sync_port.py, ``/begin`` and ``/vouch``)."""
    return _mac(key, b"areal-like vouch/2", nonce, server_id, sync_url, engine_url)


def begin_proof(key: str, nonce: str, server_id: str, incarnation: str, sync_url: str,
                engine_url: str, plan_id: str, version: int, seconds: float) -> str:
    """What only a holder of the job's engine key sends with a sync's ``/begin`` of plan
    ``plan_id`` to that port, of that server process (``incarnation``: what a squatter of the
    port's address captured before the server restarted there begins nothing) - the trainer's
    side of ``vouch_proof``, which the port answers with: each proves the key to the other in one
    round trip, before the key travels."""
    return _mac(key, b"areal-like begin/2", nonce, server_id, incarnation, sync_url, engine_url,
                plan_id, str(version), repr(float(seconds)))


def _mac(key: str, prefix: bytes, *parts: str) -> str:
    return hmac.new(key.encode(), b"\0".join((prefix, *(p.encode() for p in parts))),
                    hashlib.sha256).hexdigest()


def metrics_token() -> str | None:
    return os.environ.get(METRICS_TOKEN_ENV) or None


def http_bind_host() -> str:
    """Where a daemon's HTTP ports (``/metrics``) bind: ``AREAL_LIKE_BIND_HOST``, else loopback
    (``*`` in it, as ZeroMQ spells "every interface", is ``0.0.0.0`` here)."""
    host = os.environ.get(BIND_HOST_ENV) or LOOPBACK
    return "0.0.0.0" if host == "*" else host


def read_key_file(run_dir: str | Path) -> str | None:
    """The engine API key written by ``ensure_key_file`` in ``run_dir``, or None; SecurityError
    when the file gives others any access (``owner_only``)."""
    path = Path(run_dir) / KEY_FILE
    try:
        owner_only(path)
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def ensure_key_file(run_dir: str | Path) -> str:
    """The engine API key in ``run_dir``'s ``KEY_FILE``, made there (owner-only) when missing."""
    path = Path(run_dir) / KEY_FILE
    key = read_key_file(run_dir)
    if key:
        return key
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    key = secrets.token_hex(32)  # never starts with "-" (SGLang's parser: launch_sglang.py)
    # written whole beside it, never world-readable, then linked in: of processes making it at
    # once, the first link wins and the others read that key
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        os.link(tmp, path)
    except FileExistsError:
        return read_key_file(run_dir) or key
    finally:
        tmp.unlink(missing_ok=True)
    return key


def redact(value: Any) -> Any:
    """A copy of ``value`` with credential-named keys' values and URL passwords ``<redacted>``."""
    if isinstance(value, Mapping):
        return {k: REDACTED if isinstance(k, str) and SECRET_FIELD.search(k) and v not in (None, "")
                else redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _URL_PASSWORD.sub(rf"\1{REDACTED}@", value)
    return value


def redact_argv(argv: list[str]) -> list[str]:
    """A command line for the log: the word after a flag that looks like a secret (``--api-key``)
    and the value of ``--flag=value`` forms of them are ``<redacted>``."""
    out, hide = [], False
    for word in argv:
        if hide:
            out.append(REDACTED)
            hide = False
        elif word.startswith("--") and SECRET_FIELD.search(word.split("=", 1)[0][2:]):
            flag, eq, _ = word.partition("=")
            out.append(f"{flag}={REDACTED}" if eq else word)
            hide = not eq
        else:
            out.append(word)
    return out
