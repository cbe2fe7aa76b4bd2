"""Per-member roles and caps: what one member of the job (a key's role, or ``local``) may hold at
the buffer, and ask for; each cap counts the member's own state only (STALENESS.md, Member roles
and caps). Over a cap, a request is refused at once with a reply of the type its sender expects."""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable

from areal_like.net.transport import LOCAL_MEMBER
from areal_like.wire import protocol as P
from buffer.facts import MIN_SERVERS
from buffer.handout import PendingBatch

MAX_HELD_PER_MEMBER = 4  # BatchRequests one member may have waiting at once
NEW_IDS_PER_S = 1.0  # new server ids one member may register per second, after a burst
# messages only the trainer's role may send: its batches, and the roster (each member's engine URL,
# sync URL and incarnation: what a hijack of a server's id needs)
TRAINER_ONLY = (P.BatchRequest, P.RosterRequest)


class PeerCaps:
    def __init__(self, max_servers: int, clock: Callable[[], float]):
        self.max_servers, self.clock = max_servers, clock
        self.owner: dict[str, str] = {}  # server id -> the member that registered it last
        # member -> (new ids it may register, when)
        self.tokens: dict[str, tuple[float, float]] = {}

    def refusal(self, member: str, msg: P.Message | P.ProtocolError,
                pending: Iterable[PendingBatch], roster: Container[str]) -> tuple[str, str] | None:
        """``(reason, detail)`` when ``member`` may not send ``msg`` or is over a cap (None: a
        Register within the caps is recorded). ``pending``: the held BatchRequests."""
        if isinstance(msg, TRAINER_ONLY) and member not in ("trainer", LOCAL_MEMBER):
            return "role", f"a {member!r} key may not send {msg.TYPE} (the trainer's key only)"
        if isinstance(msg, P.BatchRequest):
            held = sum(1 for p in pending if p.member == member)
            if held >= MAX_HELD_PER_MEMBER:
                return "peer_limit", (f"member {member!r} already holds {held} BatchRequests "
                                      f"(at most {MAX_HELD_PER_MEMBER} at once)")
        elif isinstance(msg, P.Register):
            over = self._register(member, msg.server_id, roster)
            return None if over is None else ("peer_limit", over)
        return None

    def _register(self, member: str, server_id: str, roster: Container[str]) -> str | None:
        if server_id in roster and server_id in self.owner:
            self.owner[server_id] = member
            return None
        self.owner = {s: m for s, m in self.owner.items() if s in roster}  # ids gone are free
        mine = sum(1 for m in self.owner.values() if m == member)
        if mine >= self.max_servers:
            return (f"member {member!r} already has {mine} server ids on the roster (at most "
                    f"{self.max_servers}: 2 x launch.num_rollout_servers per rollout node, at "
                    f"least {MIN_SERVERS}, in the buffer's config); refused {server_id[:64]!r}")
        now = self.clock()
        tokens, since = self.tokens.get(member, (float(self.max_servers), now))
        tokens = min(float(self.max_servers), tokens + (now - since) * NEW_IDS_PER_S)
        if tokens < 1.0:
            self.tokens[member] = (tokens, now)
            return (f"member {member!r} registers new server ids faster than {NEW_IDS_PER_S:g}/s "
                    f"(after a burst of {self.max_servers}); refused {server_id[:64]!r}")
        self.tokens[member] = (tokens - 1.0, now)
        self.owner[server_id] = member
        return None
