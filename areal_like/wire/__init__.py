"""The wire: the bytes processes exchange and store, each format defined once.

Holds the messages and their encoding (``protocol``, ``codec``), a trajectory's token arrays
(``trajectory``), what a group must hold before training (``group_checks``) and the flattened
weight buckets (``weight_wire``). The WAL stores the same frames, so this is also the storage
format.

Invariants: the lowest wing; it imports no other wing of ``areal_like`` (no sockets, no settings,
no tasks), so a format reads the same in every process that decodes it.
"""
