"""An engine's side of a weight sync (phases 2-5 of areal_like/DESIGN.md section 4), as the trainer
drives each member's engine (trainer/engine_drive.py), and what it asks of the member's rollout
server beside it (``ServerPort``).

``apply_weight_sync`` drives one engine through one ``WeightSyncPlan`` in the order of
rollout_server/ROLLOUT.md, "Weight sync" (how each ``plan.path`` loads: ``RECEIVERS``);
``apply_adapter_sync`` loads a LoRA adapter instead (ROLLOUT.md, "LoRA adapters on SGLang").

Invariants:
* ``/continue_generation`` always runs, also after a failure: an engine is never left paused, and
  a session a failed bucket left open is closed first (or every later sync is refused);
* ``weight_version`` and ``flush_cache`` go only with the last bucket, so an engine whose sync
  fails half-way keeps its old label: tokens from mixed weights are never labelled newer;
* every call is bounded by what is left of ``plan.deadline_s`` (the trainer's own deadline is the
  authority); failures never raise: they become ``SyncDone(ok=False, reason=...)``.

``engine_versions`` gives the engine's torch/CUDA/NCCL for ``Register``.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
import stat
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec

from areal_like.net.answers import peer_text
from areal_like.net.auth import ENGINE_KEY_ENV, KEY_FILE, begin_proof, vouch_proof
from areal_like.net.sglang_client import EngineError, SGLangClient
from areal_like.net.store_gate import StoreDoor
from areal_like.weights.lora import served_name
from areal_like.weights.versions import RuntimeVersions, from_server_info, local_versions
from areal_like.wire.protocol import WEIGHT_PATHS, SyncDone, WeightSyncPlan
from areal_like.wire.weight_wire import FLATTENED

log = logging.getLogger(__name__)

# tearing down an old group is local work; a hang here means the group is broken
DESTROY_TIMEOUT_S = 10.0
# continue runs even after the deadline passed; it must not wait forever either
CONTINUE_TIMEOUT_S = 30.0
# engine URL -> the door its store connection to its current group runs through
_DOORS: dict[str, StoreDoor] = {}
_JOINED: dict[str, str] = {}  # engine URL -> the group its engine was last told to join
_RETIRED: dict[str, list[str]] = {}  # engine URL -> adapters no generate call names any more
_unloading: set[asyncio.Task] = set()  # unloads in the background (held: tasks are not collected)
UNLOAD_TIMEOUT_S = 600.0  # an unload returns when the last request under the adapter ends
# the engine kinds a rollout server starts as a process of its own (with LoRA: they load the
# adapter alone, ``apply_adapter_sync``)
LAUNCHED = ("sglang", "vllm")
# opens a door beside the engine to ``plan``'s store gate: the loopback port the engine joins by
Door = Callable[[WeightSyncPlan], Awaitable[int]]
# the disk path's pushes: <tmp>/<ROOT_PREFIX><the trainer's pid>_<random>/<one push> (its
# DiskSender, trainer/weight_local.py)
ROOT_PREFIX = "areal_like_weights_"


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


class _Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("weight sync deadline passed")
        return left


async def apply_weight_sync(client: SGLangClient, plan: WeightSyncPlan, server_id: str, *,
                            load_format: str | None = FLATTENED, door: Door | None = None,
                            pause_mode: str = "abort") -> SyncDone:
    """Apply ``plan`` to this server's engine; never raises, never leaves the engine paused.
    ``load_format=None`` (one broadcast per tensor) is for senders that do not pack buckets;
    ``pause_mode``: SGLang's ``/pause_generation`` mode (``rollout.pause_mode``: abort, retract);
    ``door``: the engine joins through the loopback port it opens (``local_door``, a rollout
    server's ``ServerPort.door``); None: straight to the plan's gate (the embedded engine opens
    a door of its own)."""
    member = next((m for m in plan.members if m.server_id == server_id), None)
    receiver = RECEIVERS.get(plan.path)
    refusal = "this server is not a member of the plan" if member is None else "" if receiver \
        else f"unknown weight-sync path {plan.path!r} (this server knows {', '.join(RECEIVERS)})"
    if refusal:
        return answer(plan, server_id, refusal)
    deadline = _Deadline(plan.deadline_s)
    init_task: asyncio.Task | None = None
    paused_at: float | None = None
    session_open = False
    pause_s, reason = 0.0, ""
    try:
        if plan.reform and receiver.joins_group:
            init_task = await _start_group_join(client, plan, member.rank_offset, deadline, door)
        if init_task is not None:
            await asyncio.wait_for(asyncio.shield(init_task), deadline.left())
        paused_at = time.monotonic()
        await client.pause_generation(pause_mode, timeout_s=deadline.left())
        if receiver.session:
            begin_timeout_s = deadline.left()
            # before the call: a begin whose answer is late or lost may still have opened it
            session_open = True
            await client.begin_weight_update(timeout_s=begin_timeout_s)
        await receiver.load(client, plan, load_format, deadline)
        if receiver.session:
            await client.end_weight_update(timeout_s=deadline.left())
            session_open = False
    except (EngineError, TimeoutError, asyncio.TimeoutError) as e:
        reason = f"{type(e).__name__}: {e}" if not isinstance(e, EngineError) else str(e)
        log.warning("weight sync v%d failed: %s", plan.policy_version, reason)
    finally:
        if init_task is not None and not init_task.done():
            init_task.cancel()
        # a failed bucket (e.g. a peer died mid-broadcast) must not wedge every later sync
        if session_open:
            try:
                await client.end_weight_update(timeout_s=CONTINUE_TIMEOUT_S)
            except EngineError as e:
                log.error("could not close the weight-update session after a failed sync: %s", e)
        if paused_at is not None:
            reason = await _continue(client, reason)
            pause_s = time.monotonic() - paused_at
    return answer(plan, server_id, reason, pause_s)


async def apply_adapter_sync(client: SGLangClient, plan: WeightSyncPlan, server_id: str, *,
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
    deadline = _Deadline(plan.deadline_s)
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
            reason = await _continue(client, reason)
            pause_s = time.monotonic() - paused_at
    return answer(plan, server_id, reason, pause_s)


def answer(plan: WeightSyncPlan, server_id: str, reason: str, pause_s: float = 0.0) -> SyncDone:
    """This server's report of ``plan``: loaded when there is no ``reason`` it failed."""
    return SyncDone(server_id=server_id, policy_version=plan.policy_version, plan_id=plan.plan_id,
                    ok=not reason, reason=reason, pause_s=pause_s)


def _unload_idle(client: SGLangClient) -> None:
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


async def _unload(client: SGLangClient, name: str) -> None:
    try:
        await client.unload_lora_adapter(name, timeout_s=UNLOAD_TIMEOUT_S)
    except EngineError as e:  # 400: SGLang never registered it (a load that failed, or never ran)
        log.log(logging.INFO if e.status == 400 else logging.WARNING,
                "could not unload the retired adapter %s: %s", name, e)


async def _load_broadcast(client: SGLangClient, plan: WeightSyncPlan, load_format: str | None,
                          deadline: _Deadline) -> None:
    for bucket, version, last in _in_order(plan):
        await client.update_weights_from_distributed(
            names=bucket.names, dtypes=bucket.dtypes, shapes=bucket.shapes,
            group_name=plan.group_name, weight_version=version, flush_cache=last,
            load_format=load_format, timeout_s=deadline.left())


async def _load_tensors(client: SGLangClient, plan: WeightSyncPlan, load_format: str | None,
                        deadline: _Deadline) -> None:
    for (_, version, last), payload in zip(_in_order(plan), plan.payloads):
        await client.update_weights_from_tensor([payload], flush_cache=last, weight_version=version,
                                                timeout_s=deadline.left())


async def _load_directory(client: SGLangClient, plan: WeightSyncPlan, load_format: str | None,
                          deadline: _Deadline) -> None:
    await client.update_weights_from_disk(plan.payloads[0], weight_version=str(plan.policy_version),
                                          timeout_s=deadline.left())


def _in_order(plan: WeightSyncPlan):
    """(bucket, version label, is last) in plan order: the label only on the last bucket."""
    for i, bucket in enumerate(plan.buckets):
        last = i == len(plan.buckets) - 1
        yield bucket, str(plan.policy_version) if last else None, last


@dataclass(frozen=True)
class Receiver:
    """How step 3 of one ``WeightSyncPlan.path`` loads the plan's weights into the engine."""

    load: Callable[[SGLangClient, WeightSyncPlan, str | None, _Deadline], Awaitable[None]]
    session: bool = True  # inside /begin_weight_update ... /end_weight_update
    joins_group: bool = False  # a plan with ``reform`` makes the engine join the group first


RECEIVERS = {"distributed": Receiver(_load_broadcast, joins_group=True),
             "tensor": Receiver(_load_tensors), "disk": Receiver(_load_directory, session=False)}
assert RECEIVERS.keys() == WEIGHT_PATHS.keys()  # every path a plan may name has its receiver


async def _start_group_join(client: SGLangClient, plan: WeightSyncPlan, rank_offset: int,
                            deadline: _Deadline, door: Door | None) -> asyncio.Task:
    # every formation has a name of its own: the engine's last group is the one to tear down
    for name in dict.fromkeys(n for n in (_JOINED.get(client.base_url), plan.group_name) if n):
        try:
            await client.destroy_weights_update_group(
                name, timeout_s=min(DESTROY_TIMEOUT_S, deadline.left()))
        except EngineError:
            pass  # no group yet, or the old one is already gone
    _JOINED[client.base_url] = plan.group_name
    address, port = plan.master_addr, plan.master_port
    if door is not None:
        address, port = "127.0.0.1", await door(plan)
    return asyncio.create_task(client.init_weights_update_group(
        master_address=address, master_port=port, rank_offset=rank_offset,
        world_size=plan.world_size, group_name=plan.group_name, backend=plan.backend,
        timeout_s=deadline.left()))


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


def local_door(engine_url: str, key: str) -> Door:
    """``open_door`` in this process: for an engine on this node."""
    async def door(plan: WeightSyncPlan) -> int:
        return open_door(engine_url, key, plan.master_addr, plan.master_port, plan.group_name)
    return door


class ServerPort(SGLangClient):
    """A rollout server's sync port (rollout_server/sync_port.py), as the trainer driving its
    engine calls it: its word for its engine, the door beside the engine, a sync's begin and end.
    ``vouch`` first: the other calls carry the key."""

    max_answer_bytes = 64 << 10  # its answers are small; an unvouched URL's are a stranger's
    client_name = "sync"

    async def vouch(self, server_id: str, engine_url: str, timeout_s: float) -> None:
        """EngineError unless the port proves it holds the job's key (``self.api_key``) and is
        ``server_id``'s, serving the engine at ``engine_url``: only then may the key go to either
        (a roster entry is what a member registered)."""
        nonce = secrets.token_hex(16)
        _, got, _ = await self._call("POST", "/vouch", {"nonce": nonce}, timeout_s=timeout_s,
                                     idempotent=True)
        self._proven("/vouch", got, nonce, server_id, engine_url)

    async def begin(self, plan: WeightSyncPlan, server_id: str, engine_url: str,
                    incarnation: str = "") -> None:
        """``plan``'s sync of the server's engine begins: it asks for no lease and begins no
        evaluation until ``end`` (or the deadline); answered once drained where it drains
        (rollout.drain_on_update). Sent with ``begin_proof`` instead of the key and answered with
        the port's vouch (``vouch``'s EngineError when it does not prove the key); EngineError
        409 while it evaluates."""
        nonce, seconds = secrets.token_hex(16), min(max(plan.deadline_s, 1e-3), 3600.0)
        proof = begin_proof(self.api_key or "", nonce, server_id, incarnation, self.base_url,
                            engine_url, plan.plan_id, plan.policy_version, seconds)
        body = {"plan_id": plan.plan_id, "version": plan.policy_version, "seconds": seconds,
                "nonce": nonce, "proof": proof}
        try:
            # not idempotent: the port refuses a nonce it has seen (a replay)
            _, got, _ = await self._call("POST", "/begin", body, timeout_s=plan.deadline_s,
                                         idempotent=False)
        except EngineError as e:
            if e.status != 401:
                raise
            got = None  # it found no proof of its own key in ours: another job's
        self._proven("/begin", got, nonce, server_id, engine_url)

    def _proven(self, path: str, got, nonce: str, server_id: str, engine_url: str) -> None:
        want = vouch_proof(self.api_key or "", nonce, server_id, self.base_url, engine_url)
        if not (isinstance(got, dict) and hmac.compare_digest(str(got.get("proof")), want)):
            raise EngineError(path, None, f"{peer_text(self.base_url)} does not prove the job's "
                              f"engine key for {peer_text(server_id)} at {peer_text(engine_url)}: "
                              "not this job's rollout server (or not that one), or one with "
                              f"another key ({ENGINE_KEY_ENV} or <run_dir>/{KEY_FILE} on its node)")

    async def door(self, plan: WeightSyncPlan) -> int:
        body = {"plan_id": plan.plan_id, "master_addr": plan.master_addr,
                "master_port": plan.master_port, "group_name": plan.group_name}
        _, answer_, _ = await self._call("POST", "/door", body, timeout_s=plan.deadline_s,
                                         idempotent=True)  # a second door replaces the first
        return int(answer_["port"])

    async def load_adapter_for(self, plan: WeightSyncPlan, server_id: str) -> SyncDone:
        """The server loads ``plan``'s LoRA adapter into its engine (``apply_adapter_sync`` there:
        its generate calls name the adapter, so the switch is its own); never raises."""
        try:
            _, got, _ = await self._call("POST", "/adapter", msgspec.to_builtins(plan),
                                         timeout_s=plan.deadline_s + CONTINUE_TIMEOUT_S,
                                         idempotent=False)
        except EngineError as e:
            return answer(plan, server_id, f"its rollout server: {e}")
        reason = f"its rollout server: {peer_text(got['reason'])}" if not got["ok"] else ""
        return answer(plan, server_id, reason, float(got["pause_s"]))

    async def end(self, plan: WeightSyncPlan, done: SyncDone) -> None:
        await self._call("POST", "/end", {"plan_id": plan.plan_id, "version": done.policy_version,
                                          "ok": done.ok, "pause_s": done.pause_s,
                                          "reason": done.reason[:2000]},
                         timeout_s=CONTINUE_TIMEOUT_S, idempotent=True)


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


async def _continue(client: SGLangClient, reason: str) -> str:
    try:
        await client.continue_generation(timeout_s=CONTINUE_TIMEOUT_S)
    except EngineError as e:
        log.error("could not continue generation after a weight sync: %s", e)
        reason = "; ".join(r for r in (reason, f"continue failed: {e}") if r)
    return reason


async def engine_versions(kind: str, server_info: dict) -> RuntimeVersions:
    """The torch, CUDA and NCCL an engine of ``rollout.engine.kind`` runs on. The embedded engine
    runs on this process's torch. An SGLang server is asked (``server_info``, its ``/server_info``
    answer); SGLang 0.5.23 does not say, so this process's are assumed: exact for a launched one
    (it runs on this interpreter, ``sys.executable``), a guess for one attached by URL."""
    local = await asyncio.to_thread(local_versions)  # the first torch import takes seconds
    if kind == "embedded":
        return local
    reported = from_server_info(server_info)
    if reported.known():
        return reported
    log.log(logging.INFO if kind in ("sglang", "vllm") else logging.WARNING,
            "the engine reports no torch/CUDA/NCCL versions: assuming this process's (%s)", local)
    return local
