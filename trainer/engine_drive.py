"""Rank 0 drives the engines of one push itself (trainer/WEIGHT_SYNC.md): one task per member
tells the member's rollout server the sync begins, the server vouching for its engine in its
answer (its sync port, rollout_server/sync_port.py: refused while it evaluates, answered once
drained where it drains),
runs the engine side (``areal_like/weights/push.py``: pause, join through the door that
server opens, load, continue) and tells the server how it ended (after the member's result is
known: the push does not wait for that call); on a loop thread of its own, while the push thread
broadcasts.

Invariants:
- the job's engine key goes to a member's URLs only once its sync port proved it holds the key
  and serves that engine (``ServerPort.begin``): a URL in the roster is what a member registered;
- every member's result is a ``SyncDone`` by the plan's start plus ``deadline_s`` (a drain
  included: the engine side gets what is left), never an exception: a member that fails or misses
  the deadline is a failed result;
- a member's task begins once its task of the last plan ended, its server told how it ended (or
  fails, saying so, when that one outlives this plan's deadline): a late continue never lands in
  the next plan's load, and ``/end`` of a plan comes before ``/begin`` of the next;
- ``failed`` never waits, ``wait`` returns by its deadline (the members not done then are missing
  from its answer);
- when a member is ``lost`` or ``stalled``: trainer/WEIGHT_SYNC.md, "Who drives the engines";
- one client per engine URL and sync URL lives while the roster names the URL (its connections,
  and the state a client keeps between calls of one sync: vLLM's version label, SGLang's
  adapter), kept by what it is (a sync port or an engine of a kind), its URL and the key it sends:
  a member naming another's URL as a URL of another role gets a client of its own;
- a member's words (its id, its answers' texts) reach the log quoted and cut
  (areal_like/net/answers.py ``peer_text``), and its answers are read up to their limits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable

import msgspec

from areal_like.engines import engine_client
from areal_like.engines.client import EngineClient, EngineError
from areal_like.net.answers import peer_text
from areal_like.weights.plan import LAUNCHED, SyncDone, WeightSyncPlan, answer
from areal_like.weights.push import ServerPort, apply_weight_sync
from areal_like.wire.protocol import RosterEntry

log = logging.getLogger("trainer.engine_drive")
WAIT_SLICE_S = 0.05  # ``wait`` looks at its stop request this often
# after a failed sync: an engine that does not answer /health within this is lost (gone with its
# node or process), not a survivor of another member's loss
LOST_PROBE_S = 2.0
CLOSE_TIMEOUT_S = 5.0  # the clients' connections are closed within this


class EngineDrive:
    """The engines of the pushes of one trainer (rank 0): ``start`` one plan, ``failed`` while it
    runs, ``wait`` for its results (``collect``: into a ``SyncReport``); ``close`` at the end."""

    def __init__(self, *, kind: str = "embedded", engine_key: str | None = None,
                 pause_mode: str = "retract", lora: bool = False):
        # ``kind``: a member's engine kind when its roster entry names none
        self.kind, self.engine_key, self.pause_mode, self.lora = kind, engine_key, pause_mode, lora
        # by (kind: "port" or the engine's, URL, key): engine URLs and sync URLs
        self.clients: dict[tuple[str, str, str | None], EngineClient | ServerPort] = {}
        self.runs: dict[str, concurrent.futures.Future] = {}  # of the last plan
        # each member's last task, whichever plan it was of (a member left out of a plan keeps its)
        self.last: dict[str, concurrent.futures.Future] = {}
        self.unreachable: set[str] = set()  # of the last plan: see ``lost``
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="engine-drive",
                                       daemon=True)
        self.thread.start()

    def start(self, plan: WeightSyncPlan, entries: list[RosterEntry]) -> None:
        """Run ``plan`` on each member's engine (``entries``: the roster it was made from), each
        after the member's task of the last plan ended."""
        self.unreachable = set()  # this plan's own: an earlier plan's task still ending adds to its
        by_id = {e.server_id: e for e in entries}
        live = {url for e in entries for url in (e.engine_url, e.sync_url)}
        asyncio.run_coroutine_threadsafe(self._forget(live), self.loop)
        end = time.monotonic() + plan.deadline_s
        self.runs, self.last = {}, {s: f for s, f in self.last.items() if not f.done()}
        for m in plan.members:
            # ``runs``: the member's result, known before its ``/end``; ``last``: the whole task
            self.runs[m.server_id] = result = concurrent.futures.Future()
            run = self._one(plan, end, m.server_id, by_id.get(m.server_id),
                            self.last.get(m.server_id), self.unreachable, result)
            self.last[m.server_id] = asyncio.run_coroutine_threadsafe(run, self.loop)

    async def _forget(self, live: set[str]) -> None:
        """Close the clients of URLs no roster entry names (gone, or restarted elsewhere)."""
        for key in [k for k in self.clients if k[1] not in live]:
            await self.clients.pop(key).close()

    def _client(self, kind: str, url: str) -> EngineClient | ServerPort:
        if (client := self.clients.get(key := (kind, url, self.engine_key))) is None:
            make = ServerPort if kind == "port" else functools.partial(engine_client, kind)
            client = self.clients[key] = make(url, api_key=self.engine_key)
        return client

    async def _one(self, plan: WeightSyncPlan, end: float, server_id: str,
                   entry: RosterEntry | None, last: concurrent.futures.Future | None,
                   unreachable: set[str], result: concurrent.futures.Future) -> None:
        """One member's sync, by ``end`` (``time.monotonic()``), its ``result`` set; any error is
        its failed result, never the trainer's (a member may answer anything: its URLs are what
        it registered)."""
        try:
            if last is not None and not last.done():  # its calls of the last plan end first
                await asyncio.wait([asyncio.wrap_future(last)], timeout=end - time.monotonic())
                if not last.done():  # wedged: no re-push of this version either (``lost``)
                    unreachable.add(server_id)
                    result.set_result(_refused(plan, server_id,
                                               "its sync of the last plan has not ended"))
                    return
            await self._member(plan, end, server_id, entry, unreachable, result)
        except Exception as e:  # noqa: BLE001 - a malformed answer, a client bug: this member's
            if not result.done():
                result.set_result(_refused(plan, server_id,
                                           peer_text(f"{type(e).__name__}: {e}")))

    async def _member(self, plan: WeightSyncPlan, end: float, server_id: str,
                      entry: RosterEntry | None, unreachable: set[str],
                      result: concurrent.futures.Future) -> None:
        if entry is None or not entry.engine_url or not entry.sync_url:
            result.set_result(_refused(plan, server_id, "no engine URL and sync port in the "
                                       "roster (a rollout server older than this trainer?)"))
            return
        kind = entry.engine_kind or self.kind
        # the member's server beside its engine: its word for the engine (before the key goes to
        # either), the sync's begin (refused while it evaluates; drained first where it drains)
        port, client = self._client("port", entry.sync_url), self._client(kind, entry.engine_url)
        try:
            await port.begin(msgspec.structs.replace(plan, deadline_s=_left(end)), server_id,
                             entry.engine_url, entry.incarnation)
        except EngineError as e:
            done, began = _refused(plan, server_id, f"its rollout server: {e}"), False
        else:  # the engine side ends by the plan's deadline, whatever the drain took
            plan, began = msgspec.structs.replace(plan, deadline_s=_left(end)), True
            if self.lora and kind in LAUNCHED:  # the adapter alone, switched by its server
                done = await port.load_adapter_for(plan, server_id)
            else:  # torch's join needs a door beside the engine (the embedded one opens its own)
                door = None if kind == "embedded" else port.door
                done = await apply_weight_sync(client, plan, server_id, door=door,
                                               pause_mode=self.pause_mode)
        # /health carries no key: an engine no port vouched for may be asked
        if not done.ok and not await client.health(timeout_s=LOST_PROBE_S):
            unreachable.add(server_id)
        result.set_result(done)  # the push goes on; this task (the next plan's wait) ends below
        if began:  # after a failed sync its server checks that the engine generates
            with contextlib.suppress(EngineError):
                await port.end(plan, done)

    def failed(self) -> list[str]:
        """The members whose sync already ended without loading the version."""
        return sorted(s for s, f in self.runs.items() if f.done() and not f.result().ok)

    def stalled(self) -> set[str]:
        """The members of the last plan that may hold up the next: lost, or not done by ``wait``'s
        deadline."""
        return self.lost() | {s for s, f in self.runs.items() if not f.done()}

    def lost(self) -> set[str]:
        """The members of the last plan whose sync failed and whose engine no longer answers."""
        return set(self.unreachable)

    def wait(self, deadline: float, should_stop: Callable[[], bool] = lambda: False
             ) -> dict[str, SyncDone]:
        """Every member's result, waiting until ``deadline`` (``time.monotonic()``) or a stop at
        most; a member not done by then is missing."""
        pending = set(self.runs.values())
        while pending and not should_stop() and (left := deadline - time.monotonic()) > 0:
            _, pending = concurrent.futures.wait(pending, timeout=min(WAIT_SLICE_S, left))
        return {s: f.result() for s, f in self.runs.items() if f.done()}

    def collect(self, report, deadline: float, should_stop: Callable[[], bool] = lambda: False
                ) -> None:
        """Fill ``report``'s ``done``, ``pause_s``, ``dropped`` and ``loaded`` from ``wait``: a
        member not done by ``deadline`` (or a stop) is dropped."""
        results = self.wait(deadline, should_stop)
        report.done = sorted(s for s, d in results.items() if d.ok and s in report.members)
        report.pause_s.update({s: d.pause_s for s, d in results.items()})
        report.dropped = sorted(set(report.members) - set(report.done))
        report.loaded = {s: report.plan_id for s in report.done}

    def settle(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the members whose result is known to have told their
        server how their sync ended (``/end``: it then heartbeats the version its engine serves)."""
        ending = [self.last[s] for s, f in self.runs.items() if f.done() and s in self.last]
        concurrent.futures.wait(ending, timeout=max(0.0, timeout_s))

    def close(self) -> None:
        self.settle(CLOSE_TIMEOUT_S)  # a server not told would hold its leases for the window
        for run in self.last.values():
            run.cancel()

        async def close_clients() -> None:
            await asyncio.gather(*(c.close() for c in self.clients.values()),
                                 return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(close_clients(), self.loop).result(CLOSE_TIMEOUT_S)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(CLOSE_TIMEOUT_S)
            if not self.thread.is_alive():
                self.loop.close()
            self.clients.clear()


def _refused(plan: WeightSyncPlan, server_id: str, reason: str) -> SyncDone:
    """A member's sync that failed before its engine was called (the engine side logs its own)."""
    log.warning("weight sync v%d: %s failed: %s", plan.policy_version, peer_text(server_id),
                reason)
    return answer(plan, server_id, reason)


def _left(end: float) -> float:
    return max(0.0, end - time.monotonic())
