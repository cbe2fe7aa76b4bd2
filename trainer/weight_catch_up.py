"""After the last step: make sure every rollout server serves the final version (trainer/WEIGHT_SYNC.md).

A rollout server that evaluated through the last pushes (it leaves the roster while it evaluates)
missed them, and one that registered only after the last push (it started late) never had them.
``catch_up`` waits until no server is evaluating and, when a final evaluation is scheduled, until
a server that evaluates has registered; it re-pushes the final version while a member does not
serve it, at most ``CATCH_UP_PUSHES`` times and ``timeout_s``, and returns at once on a stop request.

Invariants: a collective over all trainer ranks (rank 0 decides, one ``broadcast_object_list``
per round carries the decision, every rank then pushes or not alike); a member refused for its
versions is never waited for (it could never catch up).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from areal_like.protocol import Roster, RosterRequest
from areal_like.transport import TransportTimeout
from trainer.weight_guard import bounded

log = logging.getLogger("trainer.weight_sync")

CATCH_UP_POLL_S = 0.1  # how often to look whether an evaluating server came back (the job ends when it has)
CATCH_UP_PUSHES = 3  # re-pushes of the final version before giving up on a member


def catch_up(wb, model: torch.nn.Module, version: int, timeout_s: float,
             should_stop: Callable[[], bool] = lambda: False, final_eval: bool = False) -> int:
    """Re-push ``version`` (``wb``: the ``WeightBroadcaster``) until every member serves it, no server
    is evaluating (and, with ``final_eval``, one that evaluates is a member), ``timeout_s`` passed or
    a stop is asked for. Returns the pushes made."""
    deadline, pushes = time.monotonic() + timeout_s, 0
    while True:
        stopping = should_stop() and wb.rank == 0
        decision = [("done" if stopping else decide(wb, version, deadline, pushes, final_eval))
                    if wb.rank == 0 else None]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(decision, src=0)
        if decision[0] == "done":
            return pushes
        if decision[0] == "push":
            wb.push(model, version)
            pushes += 1
        else:
            time.sleep(CATCH_UP_POLL_S)


def decide(wb, version: int, deadline: float, pushes: int, final_eval: bool = False) -> str:
    """"wait" (a server is evaluating, or ``final_eval`` and none that evaluates registered yet), "push"
    (a member is behind) or "done" (rank 0)."""
    try:
        reply = wb.client.request(RosterRequest(), timeout_s=bounded(deadline))
    except TransportTimeout:
        return "done"
    if not isinstance(reply, Roster):
        return "done"
    behind = sorted(m.server_id for m in reply.members if m.policy_version < version
                    and m.server_id not in wb.refused)  # a refused one would never catch up
    absent = final_eval and not reply.evaluating and not any(m.evaluates for m in reply.members)
    if time.monotonic() > deadline or pushes >= CATCH_UP_PUSHES:
        if reply.evaluating or behind or absent:
            log.warning("final version %d: %s after %d pushes", version, f"{behind or reply.evaluating} still behind"
                        if not absent else "no server that evaluates registered", pushes)
        return "done"
    return "wait" if reply.evaluating or absent else "push" if behind else "done"
