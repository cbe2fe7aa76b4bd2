"""The server side of sealed bulk frames (areal_like/sealed.py): the bulk ROUTER, the handshake
answered on the CURVE socket, and opening and sealing frames. ``transport.Server`` owns one when
its process serves CURVE with ``security.sealed_bulk`` on; nothing here is used otherwise."""

from __future__ import annotations

import logging

import zmq

from areal_like import sealed, security
from areal_like.peers import is_trainer_peer
from areal_like.protocol import Message

log = logging.getLogger("transport.bulk")
_NOBLOCK = int(zmq.NOBLOCK)


class BulkEndpoint:
    """A plain ROUTER (no ZeroMQ security) on its own tcp port; only frames sealed under a session
    handed out over CURVE are accepted on it, anything else is dropped unanswered and counted."""

    def __init__(self, sock: zmq.Socket, bind_host: str, port: int, roles: set[str]):
        self.sock, self.roles, self.sessions = sock, roles, sealed.SessionTable()
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.bind(f"tcp://{bind_host}:{port or '*'}")
        self.port = int(sock.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])

    @staticmethod
    def is_hello(frames: list[zmq.Frame]) -> bool:
        return len(frames) == 3 and len(frames[2]) == len(sealed.HELLO) and frames[2].bytes == sealed.HELLO

    def hello(self, curve_sock: zmq.Socket, frames: list[zmq.Frame]) -> None:
        """Answer a HELLO that came over CURVE: a new session bound to the role the ZAP handler named
        the client by (its User-Id), or REFUSED when it has none or claims the trainer's peer id."""
        peer, req_id = frames[0].bytes, frames[1].bytes
        role = security.role_of(frames[2])
        if role not in self.roles or (is_trainer_peer(peer) and role != "trainer"):
            security.refused("sealed")
            log.warning("refused a session for peer %r with role %r", peer[:64], role)
            reply = sealed.REFUSED + f"no session for role {role!r} as this peer".encode()
        else:
            reply = sealed.welcome(self.sessions.create(role, peer), self.port)
        try:
            curve_sock.send_multipart([peer, req_id, reply], flags=_NOBLOCK)
        except zmq.Again:
            pass

    def open(self, frames: list[zmq.Frame]) -> tuple[bytes, bytes, bytes, str] | None:
        """(peer, req_id, plaintext, role) of a bulk frame, the peer being the session's CURVE peer
        id and the role its key's (the ZAP User-Id the session was handed out under); None
        (counted as refused) for anything not sealed under a live session, forged or replayed."""
        if len(frames) != 3:
            security.refused("sealed")
            return None
        route, req_id = frames[0].bytes, frames[1].bytes
        try:
            session, plain = self.sessions.open(route, req_id, frames[2].buffer)
        except sealed.SealError:
            security.refused("sealed")
            return None
        return session.peer, req_id, plain, session.role

    def reply(self, peer: bytes, req_id: bytes, writer, msg: Message) -> bool:
        """Send ``msg`` sealed if ``peer`` holds a session that has spoken on the bulk port (False: it does not)."""
        session = self.sessions.for_peer(peer)
        if session is None or session.route is None:
            return False
        try:
            writer.send_sealed(self.sock, [session.route, req_id], session.channel, msg)
        except zmq.Again:
            pass
        if session.channel.carried >= sealed.SESSION_BYTES:  # its client shakes hands again before its next request
            self.sessions.retire(session)
        return True
