"""Per-peer caps: how much of the buffer's state one ZeroMQ peer may hold.

A peer is one client socket, named by its routing id (``dealer.Client`` gives each socket a
fresh one, so a client that timed out and reconnected is a new peer; what the old one held expires
on its own). Two kinds of state outlive the request that made them, so a misbehaving peer could
pile them up:

* **held BatchRequests** (``Handout.pending``): each waits up to its own ``wait_s``. A peer may hold
  ``MAX_HELD_PER_PEER`` at once; the trainer holds one at a time, a re-send after a timeout comes
  from a new peer.
* **registered server ids** (the roster): a rollout server registers one id through its control
  socket. A peer may have ``MAX_SERVERS_PER_PEER`` ids on the roster at once (an id that left the
  roster no longer counts); registering an id again is always allowed, and a server that reconnected
  registers from a new peer that holds nothing yet (the id moves to it).

Over a cap, the request is refused at once with a reply of the type its sender expects where
the protocol has a reason for it (``Batch(groups=[], reason="peer_limit: ...")``; an
``Ack(status="rejected", reason="peer_limit: ...")`` for a Register) and counted as
``buffer/rejected{reason="peer_limit"}``. The caps count only the peer's own state: other peers
are never refused because of it.
"""

from __future__ import annotations

from collections.abc import Container, Iterable

from areal_like import protocol as P
from buffer.handout import PendingBatch

MAX_HELD_PER_PEER = 4  # BatchRequests one peer may have waiting at once
MAX_SERVERS_PER_PEER = 4  # server ids one peer may have on the roster at once
REASON = "peer_limit"


class PeerCaps:
    def __init__(self, max_held: int = MAX_HELD_PER_PEER, max_servers: int = MAX_SERVERS_PER_PEER):
        self.max_held, self.max_servers = max_held, max_servers
        self.owner: dict[str, bytes] = {}  # server id -> the peer that registered it last

    def refusal(self, peer: bytes, msg: P.Message | P.ProtocolError, pending: Iterable[PendingBatch],
                roster: Container[str]) -> str | None:
        """Why ``msg`` from ``peer`` is over its cap (None: within it; a Register is then recorded).
        ``pending``: the held BatchRequests; ``roster``: the server ids on it."""
        if isinstance(msg, P.BatchRequest):
            held = sum(1 for p in pending if p.peer == peer)
            if held >= self.max_held:
                return f"peer {_name(peer)} already holds {held} BatchRequests (at most {self.max_held} at once)"
        elif isinstance(msg, P.Register):
            return self._register(peer, msg.server_id, roster)
        return None

    def _register(self, peer: bytes, server_id: str, roster: Container[str]) -> str | None:
        if self.owner.get(server_id) != peer:
            self.owner = {s: p for s, p in self.owner.items() if s in roster}  # ids gone from the roster are free
            mine = sum(1 for p in self.owner.values() if p == peer)
            if mine >= self.max_servers:
                return (f"peer {_name(peer)} already registered {mine} server ids on the roster (at most "
                        f"{self.max_servers}); refused {server_id[:64]!r}")
        self.owner[server_id] = peer
        return None


def _name(peer: bytes) -> str:
    return repr(peer[:64])
