"""Networking and security: ZeroMQ patterns, the HTTP guard, credentials, the weight-update group.

Holds the transport (``transport``, ``dealer``, ``pubsub``, ``peers``), who may connect
(``security``: CURVE keys; ``auth``: HTTP credentials; ``http_guard``, ``store_gate``), each
daemon's ``/metrics`` server (``metrics``), the weight-update process group (``distributed``) and
the rate-limited log of peer-triggered warnings (``ratelog``). The threat model:
areal_like/SECURITY.md.

Invariants: imports only ``areal_like.wire`` below it, never settings or tasks: a socket is given
its limits and keys as values.
"""
