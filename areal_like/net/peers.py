"""Who may announce a policy version to the buffer: the trainer's peer identity.

Only trainer rank 0's weight-sync client sends ``VersionUpdate``; its ZeroMQ routing id is
``f"{TRAINER_PEER}-<6 hex>"`` (``dealer.Client(identity=TRAINER_PEER)``). The buffer refuses a
``VersionUpdate`` from any other routing id, and a rollout server may not register under a
server id that would take the trainer's prefix. This tells a legitimate peer that misbehaves (a
test tool, a rollout server with a bug) from the trainer; it is no authentication.
"""

from __future__ import annotations

TRAINER_PEER = "trainer-ws"


def is_trainer_peer(routing_id: bytes) -> bool:
    """Whether a ZeroMQ routing id is the trainer's weight-sync client."""
    return routing_id.startswith(TRAINER_PEER.encode() + b"-")


def takes_trainer_prefix(server_id: str) -> bool:
    """A rollout server id that would make its routing id look like the trainer's."""
    return server_id.startswith(TRAINER_PEER)
