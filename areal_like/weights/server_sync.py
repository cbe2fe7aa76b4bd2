"""The rollout server's side of a weight sync, beside its engine, as its sync port
(rollout_server/sync_port.py) serves the trainer: the door its engine joins a weight group by
(``open_door``), and with LoRA on a launched engine the adapter load (``apply_adapter_sync``,
rollout_server/ROLLOUT.md, "LoRA adapters on SGLang"), only from a push directory
(``in_push_dir``). The protocol: trainer/WEIGHT_SYNC.md.

Invariant: the engine is never left paused (``resume`` always runs, also when cancelled); every
call is bounded by what is left of ``plan.deadline_s``; failures become ``SyncDone(ok=False)``.
"""
from __future__ import annotations

import asyncio
import logging
import os
import stat
import tempfile
import time
from collections.abc import Awaitable, Callable

from areal_like.engines.client import EngineClient, EngineError
from areal_like.net.store_gate import StoreDoor
from areal_like.weights.lora import served_name
from areal_like.weights.plan import ROOT_PREFIX, Deadline, SyncDone, WeightSyncPlan, answer, resume

log = logging.getLogger(__name__)

# engine URL -> the door its store connection to its current group runs through
_DOORS: dict[str, StoreDoor] = {}
_RETIRED: dict[str, list[str]] = {}  # engine URL -> adapters no generate call names any more
_unloading: set[asyncio.Task] = set()  # unloads in the background (held: tasks are not collected)
UNLOAD_TIMEOUT_S = 600.0  # an unload returns when the last request under the adapter ends


def in_push_dir(path: str) -> bool:
    """Whether ``path``, symbolic links resolved, is one push's directory of the disk path (the
    only place an adapter is loaded from): a directory of a ``ROOT_PREFIX`` one in the temporary
    directory, that one a real directory of this user's that no one else may enter (as
    ``mkdtemp`` makes it: another local user's look-alike is not a push). Says nothing of whether
    the push itself exists."""
    real = os.path.realpath(path)
    root = os.path.dirname(real)
    if not (os.path.dirname(root) == os.path.realpath(tempfile.gettempdir())
            and os.path.basename(root).startswith(ROOT_PREFIX) and real != root):
        return False
    try:
        st = os.lstat(root)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


async def apply_adapter_sync(client: EngineClient, plan: WeightSyncPlan, server_id: str, *,
                             pause_mode: str = "abort") -> SyncDone:
    """Load ``plan``'s adapter (a PEFT directory) into an SGLang engine started with LoRA and make
    it the one generate calls name; never raises (but ``CancelledError``), never leaves the engine
    paused (also when cancelled), retires every adapter it sent and does not serve."""
    if not any(m.server_id == server_id for m in plan.members):
        return answer(plan, server_id, "this server is not a member of the plan")
    if plan.path != "disk" or len(plan.payloads) != 1:
        return answer(plan, server_id, "an adapter reaches SGLang as one directory (path disk), "
                                       f"not by path {plan.path!r}")
    if not os.path.isdir(plan.payloads[0]):  # SGLang would take it for a hub repository
        return answer(plan, server_id, f"no adapter directory {plan.payloads[0]} on this node "
                                       "(the trainer writes it on its own node)")
    deadline = Deadline(plan.deadline_s)
    name, old = served_name(plan.policy_version, plan.plan_id), client.adapter
    paused_at, reason, sent, ok, pause_s = None, "", False, False, 0.0
    try:
        _unload_idle(client)
        sent = True  # before the call: a load whose answer is late or lost may still happen
        await client.load_lora_adapter(name, plan.payloads[0], timeout_s=deadline.left())
        client.adapter = (name, plan.policy_version)  # before the pause: what it aborts resubmits
        paused_at = time.monotonic()
        await client.pause_generation(pause_mode, timeout_s=deadline.left())
        await client.update_weight_version(str(plan.policy_version), timeout_s=deadline.left())
        ok = True
    except (EngineError, TimeoutError, asyncio.TimeoutError) as e:
        reason = f"{type(e).__name__}: {e}" if not isinstance(e, EngineError) else str(e)
        log.warning("adapter sync v%d failed: %s", plan.policy_version, reason)
    finally:  # also on cancellation
        if sent:  # a failed one is named by no later call (one that named it meanwhile keeps it)
            new = (name, plan.policy_version)
            client.adapter, retired = (new, old) if ok else (old, new)
            if retired is not None:
                _RETIRED.setdefault(client.base_url, []).append(retired[0])
        if paused_at is not None:
            reason = await resume(client, reason)
            pause_s = time.monotonic() - paused_at
    return answer(plan, server_id, reason, pause_s)


def _unload_idle(client: EngineClient) -> None:
    """Unload, in the background, each retired adapter of ``client``'s engine that no generate call
    in flight names; the others stay retired for a later sync. SGLang's unload waits for the
    requests using the adapter while holding the lock every adapter load needs: unloading only
    idle ones, that wait ends at once and never delays a load past its deadline."""
    retired = _RETIRED.pop(client.base_url, [])
    if busy := [n for n in retired if client.running(n)]:
        _RETIRED[client.base_url] = busy
    for stale in retired:
        if stale not in busy:
            _unloading.add(task := asyncio.create_task(_unload(client, stale)))
            task.add_done_callback(_unloading.discard)


async def _unload(client: EngineClient, name: str) -> None:
    try:
        await client.unload_lora_adapter(name, timeout_s=UNLOAD_TIMEOUT_S)
    except EngineError as e:  # 400: SGLang never registered it (a load that failed, or never ran)
        log.log(logging.INFO if e.status == 400 else logging.WARNING,
                "could not unload the retired adapter %s: %s", name, e)


def open_door(engine_url: str, key: str, master_addr: str, master_port: int,
              group_name: str) -> int:
    """A door on this node's loopback to group ``group_name``'s store gate at ``master_addr:
    master_port``, proving ``key`` (the job's engine key), in place of the one the engine at
    ``engine_url`` joined its last group by; its port. EngineError when it cannot open."""
    close_door(engine_url)  # the engine's old group is gone
    try:
        door = StoreDoor(master_addr, master_port, group_name, key=key)
    except OSError as e:
        raise EngineError("store door", None,
                          f"cannot open a door to the weight group's store: {e}") from e
    _DOORS[engine_url] = door
    return door.port


def close_door(engine_url: str) -> None:
    """Close the door ``open_door`` opened for the engine at ``engine_url``, if any."""
    if (door := _DOORS.pop(engine_url, None)) is not None:
        door.close()


def local_door(engine_url: str, key: str) -> Callable[[WeightSyncPlan], Awaitable[int]]:
    """``open_door`` in this process, as a ``push.Door``: for an engine on this node."""
    async def door(plan: WeightSyncPlan) -> int:
        return open_door(engine_url, key, plan.master_addr, plan.master_port, plan.group_name)
    return door


def require_local_engine(url: str) -> str:
    """``url`` (``rollout.engine.url``) if its host is this node's; else ValueError saying why: an
    attached engine joins weight groups through a door on this server's loopback."""
    from urllib.parse import urlparse

    from areal_like.net.distributed import interface_of

    host = urlparse(url).hostname or ""
    if host != "localhost" and interface_of(host) is None:
        raise ValueError(f"rollout.engine.url={url!r}: an attached engine must run on this "
                         f"rollout server's node ({host!r} is not an address of it): it joins "
                         "the trainer's weight groups through a door on this node's loopback "
                         "(areal_like/net/store_gate.py)")
    return url
