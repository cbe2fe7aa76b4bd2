"""Per-member caps and roles: what one member of the job may hold at the buffer, and ask for.

A *member* is who holds a key, not a socket: ``transport.Server.recv_request`` names each request's
sender by the role of its CURVE key (the ZAP User-Id: ``rollout`` or ``trainer``), or ``local`` for a peer without a key (a same-node
``ipc://`` peer, admitted because the kernel said it runs as the job's user, or any peer when
``security.curve=false``). A member can open as many sockets as it likes (``dealer.Client`` gives
every socket a fresh routing id, and a flood of fresh sockets costs nothing), so every cap here
counts per member:

* **Roles.** Only the trainer takes batches and publishes weight-sync plans: a ``BatchRequest`` or a
  ``WeightSyncPlan`` from a key whose role is not ``trainer`` (a rollout server's key, a leaked one)
  is refused with ``role``, never held, and settles nothing (so it cannot make the trainer's
  batch in transit count as lost: ``buffer/handout.py``). ``local`` peers cannot be told apart
  by key (every process of the job's user can read every key anyway) and keep every right.
* **Held BatchRequests** (``Handout.pending``): a member may hold ``MAX_HELD_PER_MEMBER`` at once;
  the trainer holds one at a time (a re-send after a timeout comes from a new socket of the same
  member, after the old request's wait is over).
* **Server ids on the roster**: a member may have ``max_servers`` ids on the roster at once
  (``BufferFacts.max_servers``: twice the rollout servers the job launches, at least
  ``MIN_SERVERS``; every rollout server shares the ``rollout`` key, so this is the whole job's
  allowance, not one server's). Registering an id already on the roster is always allowed (a
  heartbeat-driven re-registration, a server on a new socket).
* **New server ids**: a member may register ids the roster does not hold at ``NEW_IDS_PER_S`` per
  second after a burst of ``max_servers`` (a token bucket): enough for every server of the job to
  join at once after a buffer restart, not for a flood that replaces expired fake ids as fast as
  they go. Each fake id joins the next weight-sync plan and holds it up to its deadline, once:
  an id that never answers a plan is left out of the later ones (``buffer/control.py``).

Over a cap, the request is refused at once with a reply of the type its sender expects
(``Batch(groups=[], reason="peer_limit: ...")``; an ``Ack(status="rejected", reason=...)`` for a
Register, which a rollout server retries after a pause) and counted as
``buffer/rejected{reason="peer_limit"|"role"}``. The caps count only the member's own state: other
members are never refused because of it. The log lines about refusals are rate-limited by the
service (``RateLimitedLog``), and so are those about ids joining and leaving the roster
(``buffer/control.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Iterable

from areal_like.net.transport import LOCAL_MEMBER
from areal_like.wire import protocol as P
from buffer.facts import MIN_SERVERS
from buffer.handout import PendingBatch

MAX_HELD_PER_MEMBER = 4  # BatchRequests one member may have waiting at once
NEW_IDS_PER_S = (
    1.0  # new server ids one member may register per second, after a burst of max_servers
)
REASON = "peer_limit"
ROLE_REASON = "role"
TRAINER_ROLE = "trainer"
TRAINER_ONLY = (P.BatchRequest, P.WeightSyncPlan)  # messages only the trainer's role may send


def may_send(member: str, msg: P.Message | P.ProtocolError) -> bool:
    """Whether ``member`` may send ``msg`` at all (roles, above)."""
    return not isinstance(msg, TRAINER_ONLY) or member in (TRAINER_ROLE, LOCAL_MEMBER)


class PeerCaps:
    def __init__(
        self,
        max_servers: int = MIN_SERVERS,
        max_held: int = MAX_HELD_PER_MEMBER,
        new_ids_per_s: float = NEW_IDS_PER_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_held, self.max_servers, self.new_ids_per_s = max_held, max_servers, new_ids_per_s
        self.clock = clock
        self.owner: dict[str, str] = {}  # server id -> the member that registered it last
        self.tokens: dict[
            str, tuple[float, float]
        ] = {}  # member -> (new ids it may register now, when)

    def refusal(
        self,
        member: str,
        msg: P.Message | P.ProtocolError,
        pending: Iterable[PendingBatch],
        roster: Container[str],
    ) -> str | None:
        """Why ``msg`` from ``member`` is over its cap (None: within it; a Register is then
        recorded).
        ``pending``: the held BatchRequests; ``roster``: the server ids on it."""
        if isinstance(msg, P.BatchRequest):
            held = sum(1 for p in pending if p.member == member)
            if held >= self.max_held:
                return (f"member {member!r} already holds {held} BatchRequests "
                        f"(at most {self.max_held} at once)")
        elif isinstance(msg, P.Register):
            return self._register(member, msg.server_id, roster)
        return None

    def _register(self, member: str, server_id: str, roster: Container[str]) -> str | None:
        if server_id in roster and server_id in self.owner:
            self.owner[server_id] = member
            return None
        self.owner = {
            s: m for s, m in self.owner.items() if s in roster
        }  # ids gone from the roster are free
        mine = sum(1 for m in self.owner.values() if m == member)
        if mine >= self.max_servers:
            return (
                f"member {member!r} already has {mine} server ids on the roster (at most "
                f"{self.max_servers}); refused {server_id[:64]!r}"
            )
        if not self._take_token(member):
            return (
                f"member {member!r} registers new server ids faster than {self.new_ids_per_s:g}/s "
                f"(after a burst of {self.max_servers}); refused {server_id[:64]!r}"
            )
        self.owner[server_id] = member
        return None

    def _take_token(self, member: str) -> bool:
        now = self.clock()
        tokens, since = self.tokens.get(member, (float(self.max_servers), now))
        tokens = min(float(self.max_servers), tokens + (now - since) * self.new_ids_per_s)
        if tokens < 1.0:
            self.tokens[member] = (tokens, now)
            return False
        self.tokens[member] = (tokens - 1.0, now)
        return True
