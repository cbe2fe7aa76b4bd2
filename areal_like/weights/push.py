"""The trainer's side of a weight sync: one member's engine driven through one ``WeightSyncPlan``
(phases 3-5 of trainer/WEIGHT_SYNC.md, as trainer/engine_drive.py runs each member), and
the client of the member's sync port beside it (``ServerPort``).

``apply_weight_sync`` drives the engine in the order of trainer/WEIGHT_SYNC.md, "Who drives the
engines", step 2 (how each ``plan.path`` loads: ``RECEIVERS``).

Invariants:
* ``/continue_generation`` always runs, also after a failure: an engine is never left paused, and
  a session a failed bucket left open is closed first (or every later sync is refused);
* ``weight_version`` and ``flush_cache`` go only with the last bucket, so an engine whose sync
  fails half-way keeps its old label: tokens from mixed weights are never labelled newer;
* every call is bounded by what is left of ``plan.deadline_s`` (the trainer's own deadline is the
  authority); failures never raise: they become ``SyncDone(ok=False, reason=...)``.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec

from areal_like.engines.client import EngineClient, EngineError, HttpClient
from areal_like.net.answers import peer_text
from areal_like.net.auth import ENGINE_KEY_ENV, KEY_FILE, begin_proof, vouch_proof
from areal_like.weights.plan import (
    CONTINUE_TIMEOUT_S,
    WEIGHT_PATHS,
    Deadline,
    SyncDone,
    WeightSyncPlan,
    answer,
    resume,
)
from areal_like.wire.weight_wire import FLATTENED

log = logging.getLogger(__name__)

# tearing down an old group is local work; a hang here means the group is broken
DESTROY_TIMEOUT_S = 10.0
_JOINED: dict[str, str] = {}  # engine URL -> the group its engine was last told to join
# opens a door beside the engine to ``plan``'s store gate: the loopback port the engine joins by
Door = Callable[[WeightSyncPlan], Awaitable[int]]


async def apply_weight_sync(client: EngineClient, plan: WeightSyncPlan, server_id: str, *,
                            load_format: str | None = FLATTENED, door: Door | None = None,
                            pause_mode: str = "abort") -> SyncDone:
    """Apply ``plan`` to this server's engine; never raises, never leaves the engine paused.
    ``load_format=None`` (one broadcast per tensor) is for senders that do not pack buckets;
    ``pause_mode``: SGLang's ``/pause_generation`` mode (``rollout.pause_mode``: abort, retract);
    ``door``: the engine joins through the loopback port it opens (``server_sync.local_door``, a
    rollout server's ``ServerPort.door``); None: straight to the plan's gate (the embedded engine
    opens a door of its own)."""
    member = next((m for m in plan.members if m.server_id == server_id), None)
    receiver = RECEIVERS.get(plan.path)
    refusal = "this server is not a member of the plan" if member is None else "" if receiver \
        else f"unknown weight-sync path {plan.path!r} (this server knows {', '.join(RECEIVERS)})"
    if refusal:
        return answer(plan, server_id, refusal)
    deadline = Deadline(plan.deadline_s)
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
            reason = await resume(client, reason)
            pause_s = time.monotonic() - paused_at
    return answer(plan, server_id, reason, pause_s)


async def _load_broadcast(client: EngineClient, plan: WeightSyncPlan, load_format: str | None,
                          deadline: Deadline) -> None:
    for bucket, version, last in _in_order(plan):
        await client.update_weights_from_distributed(
            names=bucket.names, dtypes=bucket.dtypes, shapes=bucket.shapes,
            group_name=plan.group_name, weight_version=version, flush_cache=last,
            load_format=load_format, timeout_s=deadline.left())


async def _load_tensors(client: EngineClient, plan: WeightSyncPlan, load_format: str | None,
                        deadline: Deadline) -> None:
    for (_, version, last), payload in zip(_in_order(plan), plan.payloads):
        await client.update_weights_from_tensor([payload], flush_cache=last, weight_version=version,
                                                timeout_s=deadline.left())


async def _load_directory(client: EngineClient, plan: WeightSyncPlan, load_format: str | None,
                          deadline: Deadline) -> None:
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

    load: Callable[[EngineClient, WeightSyncPlan, str | None, Deadline], Awaitable[None]]
    session: bool = True  # inside /begin_weight_update ... /end_weight_update
    joins_group: bool = False  # a plan with ``reform`` makes the engine join the group first


RECEIVERS = {"distributed": Receiver(_load_broadcast, joins_group=True),
             "tensor": Receiver(_load_tensors), "disk": Receiver(_load_directory, session=False)}
assert RECEIVERS.keys() == WEIGHT_PATHS.keys()  # every path a plan may name has its receiver


async def _start_group_join(client: EngineClient, plan: WeightSyncPlan, rank_offset: int,
                            deadline: Deadline, door: Door | None) -> asyncio.Task:
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


class ServerPort(HttpClient):
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
