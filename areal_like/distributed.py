"""The weight-update process group between trainer rank 0 and engine ranks.

``torch.distributed.new_group`` cannot build it (every rank of the caller's default world would
have to take part, and the engines are not in the trainer's world). We use the recipe SGLang,
verl and slime use (their ``init_custom_process_group``): a TCP rendezvous, a PrefixStore named after the
group, and ``_new_process_group_helper``; the result works with ``dist.broadcast(..., group=pg)``
with or without a default group in the process. Every wait is bounded by ``timeout_s``.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_weight_group(backend: str, master_addr: str, master_port: int, world_size: int, rank: int,
                      group_name: str, timeout_s: float):
    """Join (rank 0: host) the named group. Raises on timeout (a missing peer never hangs us)."""
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    timeout = timedelta(seconds=timeout_s)
    # Under torchrun TORCHELASTIC_USE_AGENT_STORE=True makes a tcp:// rendezvous connect to the elastic
    # agent's store instead of hosting its own, and the weight group would never form.
    old = os.environ.get("TORCHELASTIC_USE_AGENT_STORE")
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
    try:
        store, rank, world_size = next(rendezvous(f"tcp://{master_addr}:{master_port}", rank, world_size,
                                                  timeout=timeout))
    finally:
        if old is None:
            os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        else:
            os.environ["TORCHELASTIC_USE_AGENT_STORE"] = old
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name,
                                      timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def destroy_weight_group(pg) -> None:
    import torch.distributed as dist

    if pg is not None:
        try:
            dist.destroy_process_group(pg)
        except Exception:  # a group broken by a dead peer may refuse a clean teardown
            pass
