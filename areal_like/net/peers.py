"""Who may announce a policy version: the trainer's weight-sync client, whose routing id is
``f"{TRAINER_PEER}-<6 hex>"``. The buffer refuses a ``VersionUpdate`` from any other routing id and
a server id that would take the prefix. It tells a misbehaving member from the trainer; it is no
authentication (that is the CURVE key's role).
"""

from __future__ import annotations

TRAINER_PEER = "trainer-ws"


def is_trainer_peer(routing_id: bytes) -> bool:
    """Whether a ZeroMQ routing id is the trainer's weight-sync client."""
    return routing_id.startswith(TRAINER_PEER.encode() + b"-")


def takes_trainer_prefix(server_id: str) -> bool:
    """A rollout server id that would make its routing id look like the trainer's."""
    return server_id.startswith(TRAINER_PEER)
