"""What a peer's HTTP answer may cost this process, and how a peer's words reach a log line.

Every HTTP client of the project reads its answers here (``read_capped``, or ``read_capped_sync``
for urllib): the engine clients (``areal_like/engines/client.py``), the sync port's client
(``areal_like/weights/push.py``, ``ServerPort``), the remote reward
(``rollout_server/reward_pool.py``) and the ``/metrics`` scrape (``metrics.py``).

Invariants:
* an answer is read as a stream and never past its limit: a ``Content-Length`` over it is refused
  before a byte of the body is read; a body that runs past it is cut at the first chunk beyond and
  its connection closed. ``AnswerTooLarge`` names the URL and the limit;
* each refusal is counted by client (``refused_answers``, shown as
  ``areal_answers_refused_total{client}`` on every daemon's ``/metrics``) and logged on one line,
  at most once a minute per client (a peer can refuse answers at will);
* ``peer_text`` is the one way a peer's text (an error body, a reason, a name, a URL) goes into a
  log line or an error message: cut to ``PEER_TEXT_CHARS`` characters, then quoted by ``repr``, so
  a newline or a control character stays escaped on the one line.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any

from areal_like.net.ratelog import RateLimitedLog

log = logging.getLogger("areal_like.answers")
PEER_TEXT_CHARS = 300  # of a peer's text in one log line or error message
CHUNK_BYTES = 1 << 16  # read at most this much past an answer's limit

_refused: Counter[str] = Counter()
_lock = threading.Lock()
_warnings = RateLimitedLog(log)


class AnswerTooLarge(Exception):
    """An answer over its limit, refused (read no further than the first chunk past it)."""

    def __init__(self, url: str, limit: int):
        super().__init__(f"the answer of {peer_text(url)} is over its limit of {limit} bytes: "
                         "refused")
        self.url, self.limit = url, limit


def peer_text(text: Any, limit: int = PEER_TEXT_CHARS) -> str:
    """``text`` (a peer's) for a log line: at most ``limit`` characters, quoted, on one line."""
    text = text if isinstance(text, str) else str(text)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text) - limit} more characters)"


def refused_answers() -> dict[str, int]:
    """Answers this process refused for their size, by client (``read_capped``'s ``client``)."""
    with _lock:
        return dict(_refused)


def _refuse(client: str, url: str, limit: int, resp) -> AnswerTooLarge:
    resp.close()  # the rest is never read: the connection goes with it
    with _lock:
        _refused[client] += 1
    _warnings.warning(client, "refused an answer over %d bytes from %s (%s client)", limit,
                      peer_text(url), client)
    return AnswerTooLarge(url, limit)


async def read_capped(resp, url: str, limit: int, client: str) -> bytes:
    """The body of the aiohttp ``resp`` (to ``url``), at most ``limit`` bytes; ``AnswerTooLarge``
    past it (counted and logged for ``client``)."""
    if resp.content_length is not None and resp.content_length > limit:
        raise _refuse(client, url, limit, resp)
    body = bytearray()
    async for chunk in resp.content.iter_chunked(min(CHUNK_BYTES, limit + 1)):
        body += chunk
        if len(body) > limit:
            raise _refuse(client, url, limit, resp)
    return bytes(body)


def read_capped_sync(resp, url: str, limit: int, client: str) -> bytes:
    """``read_capped`` for a urllib (``http.client``) response."""
    declared = resp.headers.get("Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise _refuse(client, url, limit, resp)
    body = resp.read(limit + 1)
    if len(body) > limit:
        raise _refuse(client, url, limit, resp)
    return body
