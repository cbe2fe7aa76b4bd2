"""A hardened aiohttp server: every HTTP port a daemon opens (an embedded engine's API, each
daemon's ``/metrics`` and ``/health``) is ``serve``d from a ``guarded_app``, so a client that can
reach it cannot hold the server's memory, connections or event loop. What each limit answers
(503 at the connection cap after evicting an idle unvouched connection, 429, 408, 431, 413, 401):
areal_like/SECURITY.md, "Ports", and ``HttpLimits``; a body is never inflated.

The head deadline reads aiohttp's ``RequestHandler`` state (``_request_count``,
``_request_in_progress``, ``_messages``): no public hook exists (pinned by
tests/unit/test_engine_http_guard.py).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import select
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

from areal_like.net.ratelog import RateLimitedLog

log = logging.getLogger(__name__)
# a peer can send bad requests at will: no line per request
_client_errors = RateLimitedLog(log, every_s=60.0)
REFUSED_LINGER_S = 2.0
EVICT_IDLE_S = 1.0  # an unvouched kept-alive connection idle this long may go for a newcomer
HEAD_PEEK_BYTES = 1024  # what a refused connection may send before it is answered
HEALTH_LINES = (b"GET /health ", b"GET /health?")  # request lines answered past the cap
HealthAnswer = Callable[[], Awaitable[tuple[int, bytes]]]  # (status, JSON body) of a GET /health
TokenCheck = Callable[[str | None], bool]  # the Authorization header -> let in (several keys)
_BUSY = b'{"error": {"message": "too many open connections", "code": 503}}'  # as _refusal's
TOO_MANY_CONNECTIONS = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\nConnection: close\r\nRetry-After: 1\r\n\r\n%s"
                        % (len(_BUSY), _BUSY))


@dataclass(frozen=True, kw_only=True)
class HttpLimits:
    """What one client may cost a server; the defaults suit an engine's API. Every instance is a
    constant in code (no config key sets one), so the values are not re-checked here."""

    max_body_bytes: int = 64 * 2**20  # a weight bucket sent as /update_weights_from_tensor fits
    max_header_bytes: int = 8190  # one request line or header field (aiohttp's default)
    max_headers: int = 64
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keepalive_s: float = 75.0
    max_connections: int = 512
    max_inflight: int = 256


METRICS_LIMITS = HttpLimits(max_body_bytes=4096, header_timeout_s=5.0, body_timeout_s=5.0,
                            keepalive_s=30.0, max_connections=64, max_inflight=16)


@dataclass
class GuardStats:
    """Refusals so far (read by a daemon's metrics); plain ints, touched only on the server's
    loop."""

    connections: int = 0
    peak_connections: int = 0
    connections_refused: int = 0
    lingering: int = 0  # refused connections waiting for their client to close
    unauthorized: int = 0  # 401
    evicted: int = 0  # idle connections nobody vouched for, closed to make room for a new one
    timed_out: int = 0  # header or body deadline missed
    inflight: int = 0


@dataclass
class _Guard:  # noqa: D101 - the limits, token and counters of one server
    limits: HttpLimits
    token: str | TokenCheck | None
    open_paths: frozenset[str]
    capped_paths: frozenset[str] | None
    health: HealthAnswer | None = None  # answered past the cap
    stats: GuardStats = field(default_factory=GuardStats)
    handlers: dict = field(default_factory=dict)  # open connections, oldest first (eviction order)
    peekers: dict = field(default_factory=dict)  # refused, waiting for a request line, oldest first

    def make_room(self) -> bool:
        """Close the oldest idle connection that never showed the token; False if there is none."""
        for handler in self.handlers:
            if handler.evictable():
                del self.handlers[handler]
                self.stats.evicted += 1
                handler.evict()
                return True
        return False

    def drop_oldest_peeker(self) -> None:
        """Close the refused connection that has waited longest without sending its request line."""
        for handler in self.peekers:
            del self.peekers[handler]
            handler.drop_silent()
            return


def _readable(fd: int) -> bool:
    """Whether ``fd`` has something unread (or is at EOF); ``poll``: select refuses fds past
    FD_SETSIZE."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


GUARD_KEY = web.AppKey("http_guard", _Guard)


def bearer_ok(header: str | None, token: str) -> bool:
    """``header`` is ``Bearer <token>`` (constant-time comparison; any other scheme is refused).
    A header's undecodable bytes (surrogates in aiohttp's str) are encoded as they are: 401, never
    a 500."""
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].strip().encode(errors="surrogatepass"),
                               token.encode())


class _GuardedHandler(RequestHandler):
    """aiohttp's connection protocol with a connection cap and a deadline on each request's head."""

    def __init__(self, manager, guard: _Guard, **kwargs):
        lim = guard.limits
        super().__init__(manager, max_line_size=lim.max_header_bytes,
                         max_field_size=lim.max_header_bytes, max_headers=lim.max_headers,
                         keepalive_timeout=lim.keepalive_s, auto_decompress=False,
                         access_log=None, **kwargs)
        self._guard, self._deadline, self._refused, self._lingering = guard, None, False, False
        self.vouched = False  # a request on it showed the bearer token (set by the middleware)
        self._evicted, self._heard_at = False, 0.0
        self._sink, self._head = None, None  # refused: its transport, and its request line so far

    def connection_made(self, transport) -> None:
        stats, lim = self._guard.stats, self._guard.limits
        if stats.connections >= lim.max_connections and not self._guard.make_room():
            self._refuse(transport)
            return
        stats.connections += 1
        stats.peak_connections = max(stats.peak_connections, stats.connections)
        self._guard.handlers[self] = None
        self._heard_at = self._loop.time()
        super().connection_made(transport)
        self._arm()

    def evictable(self) -> bool:
        """Served a request, never vouched for, idle for ``EVICT_IDLE_S``, nothing unread."""
        # aiohttp's state, read with defaults: should a release rename one, nothing is evicted
        served = getattr(self, "_request_count", 0)
        busy = getattr(self, "_request_in_progress", True) or getattr(self, "_messages", True)
        if self.vouched or not served or busy:
            return False
        if self._loop.time() - self._heard_at < EVICT_IDLE_S or self.transport is None:
            return False
        sock = self.transport.get_extra_info("socket")
        return sock is not None and not _readable(sock.fileno())

    def evict(self) -> None:
        """Abort the connection; its slot is free at once (connection_lost comes later)."""
        self._guard.stats.connections -= 1
        self._evicted = True
        self._disarm()
        if self.transport is not None:
            self.transport.abort()

    def _refuse(self, transport) -> None:
        """Answer 503 (or a ``GET /health``: ``_peek``) without parsing a request, then linger
        (reads discarded; closing unread would reset and lose the answer) while fewer than
        max_connections do."""
        stats = self._guard.stats
        self._refused, self._sink = True, transport
        stats.connections_refused += 1
        if stats.lingering >= self._guard.limits.max_connections:
            self._guard.drop_oldest_peeker()  # silent ones make way: a /health probe gets its turn
        if stats.lingering >= self._guard.limits.max_connections or not transport.can_write_eof():
            transport.write(TOO_MANY_CONNECTIONS)
            transport.close()
            return
        stats.lingering += 1
        self._lingering = True
        if self._guard.health is None:
            self._answer_refused(TOO_MANY_CONNECTIONS)
        else:  # its request line first: silent past the deadline, it gets the 503
            self._head = bytearray()
            self._guard.peekers[self] = None
            self._deadline = self._loop.call_later(REFUSED_LINGER_S, self._answer_refused,
                                                   TOO_MANY_CONNECTIONS)

    def drop_silent(self) -> None:
        """A refused connection that sent nothing: closed unanswered, its lingering slot free."""
        self._disarm()
        self._head = None
        if self._lingering:
            self._guard.stats.lingering -= 1
            self._lingering = False
        self._sink.abort()

    def _answer_refused(self, response: bytes) -> None:
        """Write a refused connection's one answer, then linger until the client closes."""
        self._disarm()
        self._head = None
        self._guard.peekers.pop(self, None)
        if self._sink.is_closing():
            return
        self._sink.write(response)
        self._sink.write_eof()
        self._deadline = self._loop.call_later(REFUSED_LINGER_S, self._sink.abort)

    def _peek(self, data: bytes) -> None:
        """A refused connection's request line: a ``GET /health`` is answered, anything else 503."""
        self._head += data[:HEAD_PEEK_BYTES]
        if b"\r\n" not in self._head and len(self._head) < HEAD_PEEK_BYTES:
            return
        line, self._head = bytes(self._head), None
        self._guard.peekers.pop(self, None)  # it spoke: no longer one to drop for a newcomer
        self._disarm()
        if line.startswith(HEALTH_LINES):
            self._loop.create_task(self._answer_health())
        else:
            self._answer_refused(TOO_MANY_CONNECTIONS)

    async def _answer_health(self) -> None:
        status, body = await self._guard.health()
        reason = "OK" if status == 200 else "Service Unavailable"
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        self._answer_refused(head.encode() + body)

    def connection_lost(self, exc) -> None:
        if self._refused:
            self._guard.peekers.pop(self, None)
            if self._lingering:
                self._guard.stats.lingering -= 1
                self._lingering = False
                self._disarm()
            return
        if not self._evicted:
            self._guard.stats.connections -= 1
        self._guard.handlers.pop(self, None)
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            if self._head is not None:
                self._peek(data)
            return  # a refused connection's request is read and dropped
        # incremented by the parser for each request whose head is complete
        before = self._request_count
        self._heard_at = self._loop.time()
        super().data_received(data)
        if self._request_count != before:
            self._disarm()
        elif self._deadline is None and not self._request_in_progress and not self._messages:
            self._arm()  # the first bytes of the next request's head on a kept-alive connection

    def _arm(self) -> None:
        self._deadline = self._loop.call_later(self._guard.limits.header_timeout_s,
                                               self._head_too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_too_slow(self) -> None:
        self._deadline = None
        self._guard.stats.timed_out += 1
        if self.transport is not None:
            # nothing was read as a request: no answer, the socket just closes
            self.transport.abort()

    def log_exception(self, msg: str, *args, exc_info=None, **kw) -> None:
        why = (f"{type(exc_info).__name__}: {exc_info}".splitlines()[0]
               if isinstance(exc_info, BaseException) else "")
        _client_errors.warning(f"{msg}:{type(exc_info).__name__}", "HTTP: " + msg + " (%s)",
                               *args, why)

    def handle_error(self, request, status: int = 500, exc=None, message=None):
        if isinstance(exc, LineTooLong) or (isinstance(exc, BadHttpMessage)
                                            and "Too many headers" in str(exc)):
            status, message = 431, "Request Header Fields Too Large"  # aiohttp says 400
        return super().handle_error(request, status, exc, message)


def _guard_middleware(guard: _Guard):
    lim, stats = guard.limits, guard.stats

    @web.middleware
    async def guard_mw(request: web.Request, handler):
        if guard.token is not None and request.path not in guard.open_paths:
            header, token = request.headers.get("Authorization"), guard.token
            if not (token(header) if callable(token) else bearer_ok(header, token)):
                stats.unauthorized += 1
                refused = _refusal(401, "missing or wrong bearer token",
                                   {"WWW-Authenticate": "Bearer"})
                refused.force_close()  # "Connection: close": the connection ends with the answer
                return refused
            if isinstance(request.protocol, _GuardedHandler):
                request.protocol.vouched = True  # its idle time is a member's: never evicted
        capped = guard.capped_paths is None or request.path in guard.capped_paths
        if capped and stats.inflight >= lim.max_inflight:
            return _refusal(429, f"over {lim.max_inflight} requests in flight; retry later",
                            {"Retry-After": "1"})
        stats.inflight += capped
        try:
            if request.content_length is not None and request.content_length > lim.max_body_bytes:
                return _too_large(request, lim)
            if request.can_read_body:
                try:
                    await asyncio.wait_for(request.read(), lim.body_timeout_s)
                except asyncio.TimeoutError:
                    stats.timed_out += 1
                    return _refusal(408, f"body not received within {lim.body_timeout_s}s",
                                    {"Connection": "close"})
                except web.HTTPRequestEntityTooLarge:
                    return _too_large(request, lim)
            return await handler(request)
        finally:
            stats.inflight -= capped
    return guard_mw


def _too_large(request: web.Request, lim: HttpLimits) -> web.Response:
    return _refusal(413, f"request body over {lim.max_body_bytes} bytes", {"Connection": "close"})


def _refusal(status: int, message: str, headers: dict) -> web.Response:
    """A refusal as the OpenAI API words one (``{"error": {"message": ...}}``): its SDKs show
    only that message (the agent endpoint's clients), the engine clients read it too."""
    return web.json_response({"error": {"message": message, "code": status}}, status=status,
                             headers=headers)


def guarded_app(*, limits: HttpLimits, token: str | TokenCheck | None = None,
                open_paths: tuple[str, ...] = (), capped_paths: tuple[str, ...] | None = None,
                middlewares: tuple = (),
                health: HealthAnswer | None = None) -> web.Application:
    """An ``aiohttp`` application whose first middleware enforces ``limits`` and ``token`` (or a
    check of the ``Authorization`` header); ``serve`` it for the connection limits too."""
    guard = _Guard(limits, token, frozenset(open_paths),
                   None if capped_paths is None else frozenset(capped_paths), health)
    app = web.Application(middlewares=[_guard_middleware(guard), *middlewares],
                          client_max_size=limits.max_body_bytes)
    app[GUARD_KEY] = guard
    return app


class GuardedServer:
    """A started server for a ``guarded_app``: ``.port``, ``.stats``, ``await .close()``."""

    def __init__(self, runner: web.AppRunner, server: asyncio.AbstractServer, guard: _Guard):
        self.runner, self._server, self._guard = runner, server, guard
        self.port: int = server.sockets[0].getsockname()[1]

    @property
    def stats(self) -> GuardStats:
        return self._guard.stats

    async def close(self) -> None:
        self._server.close()
        await self.runner.cleanup()


async def serve(app: web.Application, host: str, port: int, *, shutdown_timeout_s: float = 2.0,
                handler_cancellation: bool = True) -> GuardedServer:
    """Bind ``host:port`` (0 = a free port) and serve ``app`` (made by ``guarded_app``) on the
    running loop."""
    guard: _Guard = app[GUARD_KEY]
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout_s,
                           handler_cancellation=handler_cancellation)
    await runner.setup()
    manager, loop = runner.server, asyncio.get_running_loop()
    try:
        server = await loop.create_server(lambda: _GuardedHandler(manager, guard, loop=loop),
                                          host, port,
                                          backlog=min(guard.limits.max_connections, 1024),
                                          reuse_address=True)
    except BaseException:
        await runner.cleanup()
        raise
    return GuardedServer(runner, server, guard)
