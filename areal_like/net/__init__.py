"""Networking and security (layout: areal_like/DESIGN.md section 7; threat model:
areal_like/SECURITY.md). Invariant: imports only ``areal_like.wire`` below it, never settings or
tasks: a socket is given its limits and keys as values.
"""
