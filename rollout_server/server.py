"""The rollout server daemon: keeps one engine busy and streams scored groups to the buffer.

Owns its engine (embedded, a launched SGLang or vLLM, or attached by URL), its episodes and its
evaluations; its groups and leases go through ``buffer_link.py``. The trainer drives the engine's
weight syncs itself, asking this server (``sync_port.py``) only to vouch for its engine, for the
door beside the engine and to be told when a sync begins and ends (trainer/WEIGHT_SYNC.md). Holds no
durable state: a crash loses only unacknowledged work, whose leases the buffer re-issues. The loop,
the failure table and the evaluation choreography: rollout_server/ROLLOUT.md.

Invariants:
* a group is re-sent until acked, also across buffer restarts (``known=False``: register again,
  re-send everything unacked);
* at most ``rollout.max_concurrent_groups`` episodes run at once (counting leases asked for and not
  yet answered);
* the sync window (no lease and no evaluation between a sync's ``begin`` and its ``end``; calls of
  any other plan refused, ``sync_under_way``): trainer/WEIGHT_SYNC.md, "Who drives the engines";
* ``policy_version`` is the version the engine serves: its label, read from the engine after a
  sync's ``end`` and after each heartbeat outside a sync (whoever loaded it);
* after a failed sync the engine must answer ``/health_generate`` (and, after a sync abandoned
  by the trainer, the calls that end and continue it) within ``ENGINE_PROBE_S``, else this server
  stops (exit 1, the wedged engine killed with it) for its supervisor to restart it
  with a fresh engine; an engine attached by URL is only reported.

Concurrency: one asyncio loop; heartbeats, announcements, the link's sender and each episode are
tasks. A background task that dies takes the daemon down (exit 1).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from dataclasses import replace
from urllib.parse import urlparse

from areal_like.daemon import ComponentStopped, Daemon, StartRefused
from areal_like.engines import engine_client
from areal_like.engines.client import EngineError
from areal_like.net.answers import peer_text
from areal_like.net.auth import ENGINE_KEY_ENV, KEY_FILE, ensure_key_file
from areal_like.net.dealer import AsyncClient
from areal_like.net.distributed import reachable_host
from areal_like.net.pubsub import Subscriber
from areal_like.net.security import Keys, check_local
from areal_like.net.store_gate import refused_total
from areal_like.net.transport import TransportTimeout
from areal_like.settings.config import ConfigError, RolloutConfig, RunConfig
from areal_like.tasks.task import make_task
from areal_like.tasks.tokenizer import load_tokenizer
from areal_like.weights.plan import CONTINUE_TIMEOUT_S, LAUNCHED, SyncDone, WeightSyncPlan
from areal_like.weights.server_sync import (
    apply_adapter_sync,
    close_door,
    open_door,
    require_local_engine,
)
from areal_like.weights.versions import RuntimeVersions, engine_versions
from areal_like.wire.protocol import (
    Ack,
    Credit,
    Heartbeat,
    HeartbeatAck,
    Register,
    RegisterAck,
    VersionUpdate,
)
from rollout_server.buffer_link import BufferLink, raise_if_superseded, wait_event
from rollout_server.engine_process import EngineProcess, StartAborted, stop_group
from rollout_server.episode import EpisodeContext, as_version, run_episode
from rollout_server.facts import RolloutFacts
from rollout_server.multiturn import EpisodeRunner
from rollout_server.reward_pool import RewardPool, RewardPoolError
from rollout_server.sync_port import BeginBody, DoorBody, EndBody, SyncPort, SyncRefused
from rollout_server.teacher import TeacherError

# the main loop also wakes on events; the tick only bounds reaction to stop requests
LOOP_TICK_S = 0.2
# a healthy buffer answers in ms (one fsync per batch); 5 s means gone or wedged
BUFFER_TIMEOUT_S = 5.0
REGISTER_RETRY_S = 2.0  # a Register refused over the buffer's caps is sent again after this
# last sends on stop; well inside the launcher's grace period (GRACEFUL_STOP_S)
FLUSH_ON_STOP_S = 3.0
CANCEL_WAIT_S = 5.0  # on stop: the background tasks and episodes end within it (else: warned)
LEAVE_TIMEOUT_S = 2.0  # the last heartbeat (``leaving``) of a stop; a buffer gone: expiry does it
MAX_EPISODE_FAILURES = 5  # consecutive failed episodes (engine errors): the engine is broken; exit
# a failure recorded with a launched engine: how long its exit may take to show (the kernel closes
# a killed process's sockets before its parent can reap it)
ENGINE_EXIT_GRACE_S = 2.0
# before a heartbeat: the engine's version label, read within this (else the last one stands)
ENGINE_VERSION_READ_S = 2.0
ENGINE_PROBE_S = 30.0  # after a failed sync: /health_generate (one token) must answer within this
DRAIN_SHARE = 0.5  # of a sync's deadline, at most, waiting for episodes to end (drain_on_update)
SYNC_INFO_EVERY = 100  # a sync's line is DEBUG but every this many versions (a failure: WARNING)


def launched_engine(kind: str) -> type[EngineProcess]:
    """The process class of a launched engine of ``kind`` (``sglang``, ``vllm``)."""
    if kind == "vllm":
        from rollout_server.launch_vllm import VLLMProcess

        return VLLMProcess
    from rollout_server.launch_sglang import SGLangProcess

    return SGLangProcess


class RolloutServer(Daemon):
    name = "rollout"

    def __init__(self, rcfg: RolloutConfig, facts: RolloutFacts):
        super().__init__(metrics_port=rcfg.metrics_port)
        self.rcfg, self.facts = rcfg, facts
        # the agent endpoint's host: rollout.engine.host as set (loopback by default), kept when
        # the engine listens toward the head node (``engine_toward_head``): only this server's
        # own agent workers call it
        self.agent_host = rcfg.engine.host
        self.server_id = self.rcfg.server_id or f"{socket.gethostname()}-{os.getpid()}"
        self.incarnation = secrets.token_hex(8)  # this process in each Register (buffer/control.py)
        self.policy_version = 0
        self.engine = None
        self.rewards: RewardPool | None = None
        self.reward_model = None  # task.reward_model (rollout_server/reward_model.py)
        self.teachers = []  # distill.teachers (rollout_server/teacher.py)
        self.tools = None  # ToolPool of task.env's tools, or the agent pool (task.agent)
        self.agent_endpoint = None  # task.agent: the OpenAI-compatible endpoint of its episodes
        self.engine_url, self.engine_ranks = "", 1
        self.max_input = 0  # the engine refuses an input this long (meet_engine; 0: none)
        self.versions = RuntimeVersions()  # the engine's torch/CUDA/NCCL, for Register
        self.link: BufferLink | None = None  # made with the buffer connections (main)
        self.episodes: set[asyncio.Task] = set()
        self.episode_failures = 0
        # the trainer's sync of our engine is under way until then (``time.monotonic()``; its
        # ``begin`` and ``end``): no lease is asked for, no evaluation begins
        self.sync_until, self.sync_version = 0.0, -1
        self.sync_plan = ""  # the plan of the sync that began and has not ended ("": none)
        self.syncs_begun = 0  # a label read while one began is stale (``read_engine_version``)
        self.resuming: asyncio.Task | None = None  # continuing the engine of an abandoned sync
        self.sync_port: SyncPort | None = None  # made in main
        self.sync_url = ""
        self.after_sync: set[asyncio.Task] = set()  # what a sync's ``end`` started
        # rollout.eval: runs the job's evaluations (rollout_server/evaluate.py)
        self.evaluator = None
        # told to the buffer in heartbeats: it leaves us out of weight syncs
        self.evaluating = False
        # the version under evaluation: the trainer's syncs are refused meanwhile (``begin``)
        self.eval_version: int | None = None
        self.eval_task: asyncio.Task | None = None
        self.pub_address = self.rcfg.pub_address
        self.started = False  # start() finished: the engine is up
        self.closing = False  # main is in its last part (flush, leave): a stop does not cancel it
        self.wedged = False  # no answer after a failed sync: on exit the engine is killed

    @classmethod
    def from_run(cls, cfg: RunConfig, keys: Keys | None = None) -> RolloutServer:
        """The server of the job ``cfg`` describes: its ``rollout`` section plus ``RolloutFacts`` of
        the rest, its ZeroMQ sockets CURVE clients with ``keys`` (None: plain)."""
        return cls(cfg.rollout, RolloutFacts.from_run(cfg, keys))

    # ------------------------------------------------------------------ lifecycle
    def engine_toward_head(self):
        """The engine's settings, listening where trainer rank 0's log-prob guard probes it from
        the head node (the buffer's) on several nodes: not a host name that resolves to loopback
        here."""
        ecfg = self.rcfg.engine
        if self.facts.nodes > 1 and ecfg.kind != "url" and self.rcfg.buffer_address.startswith(
                "tcp://"):
            head = self.rcfg.buffer_address[len("tcp://"):].rsplit(":", 1)[0]
            ecfg = replace(ecfg, host=reachable_host(ecfg.host, head))
            if ecfg.host != self.rcfg.engine.host:
                self.log.info("engine: %s resolves to loopback here; listening on %s, this node's "
                         "address toward the head node %s", self.rcfg.engine.host, ecfg.host, head)
                self.rcfg = replace(self.rcfg, engine=ecfg)
        return ecfg

    def start(self) -> None:
        for address in (self.rcfg.buffer_address, self.pub_address):  # main() connects them
            check_local(address)  # a directory others may enter: a refused start, no engine
        ecfg = self.engine_toward_head()
        if self.facts.engine_key is None:  # started by hand, first of its job: it makes the key
            self.facts = replace(self.facts, engine_key=ensure_key_file(self.facts.run_dir))
        self.api_key = self.facts.engine_key  # the job's: the trainer drives the engine with it
        self.tokenizer = None  # a launched engine's start loads it while the engine loads
        if not self.start_engine(ecfg):
            return
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.facts.model)
        self.task = make_task(self.facts.task, self.tokenizer)
        self.rewards = RewardPool(self.facts.task, self.task.reward_path, metrics=self.metrics)
        if self.facts.task.reward_model.enabled:  # trusted weights, run here (reward_model.py)
            from rollout_server.reward_model import RewardModel

            self.reward_model = RewardModel(self.facts.task.reward_model,
                                            self.facts.task.reward_timeout_s, self.metrics)
        if self.facts.distill.enabled:  # engines at URLs (the job's teacher processes')
            from rollout_server.teacher import teachers

            self.teachers = teachers(self.facts.distill, self.metrics, api_key=self.api_key)
        # multi-turn episodes (rollout_server/multiturn.py): their tools run here
        if self.facts.task.env and not self.facts.task.agent:  # a verifiers env's are its own
            from rollout_server.tool_pool import ToolPool

            task = self.facts.task
            self.tools = ToolPool(task.tool_workers, task.tool_timeout_s, task.tool_memory_mb,
                                  reply_mb=task.worker_reply_mb, network=task.worker_network)
        if self.facts.task.agent:  # agent episodes (agent_episode.py): a bad path fails here
            from rollout_server.agent_episode import agent_pool
            from rollout_server.agent_worker import agent_problem

            if problem := agent_problem(self.facts.task.agent):
                raise ConfigError(problem)
            self.tools = agent_pool(self.facts.task)
        if self.rcfg.eval:
            from rollout_server.evaluate import ServerEvaluator

            self.evaluator = ServerEvaluator(self.facts, self.tokenizer, self.rewards, self.metrics)
            self.log.info("evaluating %d eval prompts %s", len(self.evaluator.examples),
                          self.evaluator.schedule.describe())
        self.metrics.count_refusals("weight_sync", refused_total)  # its engines' store doors
        # at 0 from the start: alert EngineNotGenerating (its rate is 0) sees an idle new engine,
        # and the dashboard's resend and resume panels show 0 rather than "No data"
        for name, doc in (("rollout/tokens_generated", "output tokens received"),
                          ("rollout/groups_resent", "TrajectoryGroup sends"),
                          ("rollout/aborted_resumed_requests", "aborted requests resubmitted")):
            self.metrics.counter(name, doc)
        self.log.info("server %s, engine %s (%s)", self.server_id, self.engine_url, ecfg.kind)
        self.started = True

    def start_engine(self, ecfg) -> bool:
        """Starts (or attaches to) this server's engine; False when a stop came first."""
        if ecfg.kind == "embedded":
            from rollout_server.engine import EmbeddedEngine

            self.engine = EmbeddedEngine(self.facts.model, ecfg, api_key=self.api_key,
                                         group_key=self.facts.engine_key,
                                         lora=self.facts.lora).start()
            self.engine_url = self.engine.url
            self.metrics.count_refusals("engine", lambda: self.engine.unauthorized)
        elif ecfg.kind in LAUNCHED:
            log_path = str(self.facts.run_dir / f"logs/{ecfg.kind}-{self.server_id}.log")
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            self.engine = launched_engine(ecfg.kind)(
                self.facts.model, ecfg, log_path, api_key=self.api_key, lora=self.facts.lora,
                routed_experts=self.facts.routed_experts)
            try:
                self.engine.start(stop_requested=self.stop_requested.is_set,
                                  meanwhile=self._load_tokenizer)
            except StartAborted:  # stopped while it started (it is stopped too): nothing to run
                self.engine = None
                return False
            self.engine_url, self.engine_ranks = self.engine.url, self.engine.engine_ranks
        else:
            # it joins weight groups through our loopback door
            self.engine_url = require_local_engine(ecfg.url)
        return True

    def _load_tokenizer(self) -> None:
        self.tokenizer = load_tokenizer(self.facts.model)

    def stop(self) -> None:
        for pool in (self.tools, self.rewards, self.reward_model):
            if pool is not None:
                pool.close()
        self.tools = self.rewards = self.reward_model = None
        self.teachers = []
        if self.engine is not None:
            proc = getattr(self.engine, "proc", None)  # a launched SGLang: its process group
            if self.wedged and proc is not None:
                stop_group(proc, grace_s=0.0)  # a wedged engine does not act on SIGTERM in time
            self.engine.stop()
            self.engine = None

    def run(self) -> None:
        if self.started:  # else a stop came during start()
            asyncio.run(self.serve_until_stopped())

    async def serve_until_stopped(self) -> None:
        """Run ``main`` until a stop is requested, then cancel it wherever it waits, unless it is
        closing already: cancelled there, it skipped the flush of unacked groups and the goodbye."""
        main = asyncio.create_task(self.main())
        while not main.done() and not self.stop_requested.is_set():
            await asyncio.wait({main}, timeout=LOOP_TICK_S)
        if not self.closing:
            main.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await main

    def health(self) -> tuple[bool, dict]:
        """Healthy once ``start`` has its engine up (the launcher starts a trainer sharing the GPU
        only then)."""
        return self.failure is None and self.started, {
            "name": self.name, "server_id": self.server_id, "policy_version": self.policy_version,
            "unacked": len(self.link.unacked) if self.link else 0, **self.failed()}

    # ------------------------------------------------------------------ the loop
    async def main(self) -> None:
        self.wake = asyncio.Event()
        self.client = engine_client(
            self.rcfg.engine.kind, self.engine_url,
            generate_timeout_s=self.rcfg.engine.request_timeout_s,
            api_key=self.api_key,  # an embedded engine answers /generate in-process
            local=self.engine if self.rcfg.engine.kind == "embedded" else None,
            routed_experts=self.facts.routed_experts)
        to_buffer = {"keys": self.facts.keys, "timeout_s": BUFFER_TIMEOUT_S,
                     "identity": self.server_id}
        self.control = AsyncClient(self.rcfg.buffer_address, **to_buffer)
        self.data = AsyncClient(self.rcfg.buffer_address, **to_buffer)
        self.link = BufferLink(self.control, self.data, self.server_id, self.metrics,
                               free_slots=lambda: (self.rcfg.max_concurrent_groups
                                                   - len(self.episodes)),
                               blocked=self.in_sync,
                               start=self.start_episode, incarnation=self.incarnation)
        background = []
        try:
            await self.client.wait_healthy(self.rcfg.engine.startup_timeout_s)
            await self.meet_engine()
            await self.open_sync_port()
            self.metrics.gauge("rollout/policy_version",
                               "version the engine serves").set(self.policy_version)
            await self.register(fresh=True)
            background = [asyncio.create_task(c, name=c.__name__) for c in
                          (self.heartbeats(), self.announcements(), self.link.sender())]
            while not self.stop_requested.is_set():
                self.raise_if_engine_died()  # first: a dead engine also fails every episode
                self.raise_if_component_stopped()
                _raise_if_done(background)
                self.end_abandoned_sync()
                self.maybe_evaluate()
                self.link.start_held()
                if not await self.link.request_credits():
                    await self.register()  # the buffer does not know us
                self.wake.clear()
                await wait_event(self.wake, LOOP_TICK_S)
        finally:
            self.closing = True  # bounded from here on (``wind_down``): never cancelled half-way
            await self.wind_down([*background, *self.episodes,
                                  *([self.eval_task] if self.eval_task else [])])

    async def meet_engine(self) -> None:
        """The engine's version, TP size, torch/CUDA/NCCL (told in Register) and input limit; then,
        for an agent task, the agent endpoint, whose calls know that limit. An engine attached
        by URL that refuses the job's key is refused here (exit 2: a restart sends the same key)."""
        kind = self.rcfg.engine.kind
        try:  # SGLang's "default" label: the initial weights, version 0
            self.policy_version = as_version(await self.client.weight_version(), 0)
        except EngineError as e:
            if kind != "url" or e.status != 401:
                raise
            raise StartRefused(
                f"the engine at {self.engine_url} (rollout.engine.kind=url) refused the job's "
                f"engine API key (HTTP 401): start it with --api-key set to that key "
                f"({ENGINE_KEY_ENV}, else {self.facts.run_dir / KEY_FILE}, which `areal-like keys "
                "RUN_DIR` makes before the job starts)") from None
        info = (self.engine.server_info() if kind == "embedded"
                else await self.client.server_info())
        # an engine refuses a prompt of max_req_input_len tokens or more: none is sent (ROLLOUT.md)
        if isinstance(limit := info.get("max_req_input_len"), int):
            self.max_input = limit
        if kind == "url":  # its TP size decides how many group ranks it takes
            self.engine_ranks = int(info.get("tp_size") or 1)
        self.versions = await engine_versions(kind, info)
        if self.facts.task.agent:
            await self.start_agent_endpoint()

    async def wind_down(self, others: list[asyncio.Task]) -> None:
        """The end of ``main``: cancel ``others`` (``CANCEL_WAIT_S``), send what is unacked
        (``FLUSH_ON_STOP_S``), leave the roster (``LEAVE_TIMEOUT_S``), close the connections."""
        for t in others:
            t.cancel()
        if others and (left := (await asyncio.wait(others, timeout=CANCEL_WAIT_S))[1]):
            # asyncio.run cancels them again at its end
            self.log.warning("%d tasks still ending: %s", len(left), [t.get_name() for t in left])
        await self.link.flush(FLUSH_ON_STOP_S)
        await self.leave()
        if self.agent_endpoint is not None:
            await self.agent_endpoint.close()
        if self.sync_port is not None:
            await self.sync_port.close()
        close_door(self.engine_url)
        await self.client.close()
        for teacher in self.teachers:
            await teacher.client.close()
        self.control.close()
        self.data.close()

    def raise_if_engine_died(self) -> None:
        """A launched SGLang that died stops this server (exit 1) at the next tick, instead of
        failing episode after episode (ROLLOUT.md, "A launched SGLang that dies"). With a failure
        recorded, the engine first gets ``ENGINE_EXIT_GRACE_S`` to show an exit: a dying SGLang
        closes its sockets (its episodes fail) a moment before this process can reap it."""
        wait_s = 0.0 if self.failure is None else ENGINE_EXIT_GRACE_S
        if (died := self.engine_death(wait_s)) is not None:
            raise died

    def engine_death(self, wait_s: float = 0.0) -> ComponentStopped | None:
        """Why this server stops if the SGLang it launched exits within ``wait_s``; else None."""
        if self.rcfg.engine.kind not in LAUNCHED or self.engine is None:
            return None
        if (code := self.engine.exit_code(wait_s)) is None:
            return None
        return ComponentStopped(f"its {self.engine.NAME} engine (pid {self.engine.proc.pid}) "
                                f"exited with code {code}")

    # ------------------------------------------------------------------ buffer control
    async def register(self, fresh: bool = False) -> None:
        """Register, retrying until the buffer answers or a stop. ``fresh``: the first time since
        this process started; every Register carries this process's ``incarnation``."""
        msg = Register(server_id=self.server_id, engine_url=self.engine_url,
                       engine_ranks=self.engine_ranks,
                       policy_version=self.policy_version, torch_version=self.versions.torch,
                       cuda_version=self.versions.cuda, nccl_version=self.versions.nccl,
                       evaluates=self.evaluator is not None, fresh=fresh,
                       incarnation=self.incarnation, engine_kind=self.rcfg.engine.kind,
                       sync_url=self.sync_url)
        while not self.stop_requested.is_set():
            try:
                ack = await self.control.request(msg)
            except TransportTimeout:
                self.log.warning("buffer at %s not answering; retrying registration",
                                 self.rcfg.buffer_address)
                continue
            if isinstance(ack, RegisterAck):
                # a same-node server keeps its own ipc:// one
                if not self.pub_address.startswith("ipc://"):
                    self.pub_address = ack.pub_address or self.pub_address
                self.log.info("registered with the buffer (trainer version %d)", ack.policy_version)
                return
            # the buffer caps new server ids per key (buffer/peer_caps.py), and keeps our id for
            # a process of it still heard (a restart within buffer.heartbeat_timeout_s of a
            # kill): try again shortly
            retry = isinstance(ack, Ack) and ack.reason.startswith(("peer_limit", "id_in_use"))
            if not retry:
                raise RuntimeError(f"unexpected answer to Register: {ack!r}")
            self.log.warning("registration refused (%s); retrying in %.0fs", ack.reason,
                             REGISTER_RETRY_S)
            await asyncio.sleep(REGISTER_RETRY_S)

    async def heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.rcfg.heartbeat_s)
            await self.heartbeat()

    async def read_engine_version(self) -> None:
        """The version the engine labels its tokens with, whoever loaded it; a busy engine that
        does not answer in ``ENGINE_VERSION_READ_S`` keeps the last one read (a wedged one is
        the failed sync's probe's)."""
        begun = self.syncs_begun
        try:
            label = await asyncio.wait_for(self.client.weight_version(), ENGINE_VERSION_READ_S)
        except (EngineError, asyncio.TimeoutError):
            return
        if begun != self.syncs_begun:  # a sync began meanwhile: its end reads the label again
            return
        if (version := as_version(label, self.policy_version)) != self.policy_version:
            self.policy_version = version
            self.metrics.gauge("rollout/policy_version",
                               "version the engine serves").set(self.policy_version)

    async def heartbeat(self) -> None:
        msg = Heartbeat(server_id=self.server_id, policy_version=self.policy_version,
                        in_flight=len(self.episodes), evaluating=self.evaluating,
                        incarnation=self.incarnation)
        try:
            ack = await self.control.request(msg)
        except TransportTimeout:
            self.log.warning("heartbeat timed out (buffer down or restarting)")
            return
        raise_if_superseded(ack)
        if not isinstance(ack, HeartbeatAck):
            return
        if ack.challenged:  # another process tried to take our id (buffer/STALENESS.md)
            self.log.warning("buffer: %s", ack.challenged)
        if not ack.known:  # the buffer restarted or expired us: join again, re-send all unacked
            self.log.info("buffer does not know us: registering again, re-sending %d groups",
                          len(self.link.unacked))
            await self.register()
            self.link.resend_all()
        if not self.in_sync():  # for the next heartbeat; a sync's end reads it first
            await self.read_engine_version()

    async def leave(self) -> None:
        """Tell the buffer this server stops (its leases go to the others, a weight sync stops
        waiting for it) instead of leaving it to find out ``buffer.heartbeat_timeout_s`` later."""
        try:
            await self.control.request(Heartbeat(server_id=self.server_id,
                                                 policy_version=self.policy_version, leaving=True,
                                                 incarnation=self.incarnation),
                                       timeout_s=LEAVE_TIMEOUT_S)
            self.log.info("left the buffer's roster")
        except TransportTimeout:
            self.log.warning("the buffer did not answer our leaving; it drops us after "
                             "buffer.heartbeat_timeout_s")

    async def announcements(self) -> None:
        sub = Subscriber(self.pub_address, keys=self.facts.keys, asyncio_ctx=True)
        try:
            while True:
                msg = await sub.arecv(0.5)
                if isinstance(msg, VersionUpdate):
                    self.metrics.gauge("rollout/trainer_version",
                                       "latest announced trainer version").set(msg.policy_version)
                    self.link.window_moved()  # ask for leases now, not after a back-off
                    self.wake.set()
        finally:
            sub.close()

    # ------------------------------------------------------------------ episodes and groups
    def episode_context(self) -> EpisodeContext:
        return EpisodeContext(client=self.client, task=self.task, tokenizer=self.tokenizer,
                              rewards=self.rewards, task_cfg=self.facts.task,
                              server_id=self.server_id, incarnation=self.incarnation,
                              current_version_fn=lambda: self.policy_version, metrics=self.metrics,
                              context=self.facts.context, max_input=self.max_input,
                              reward_model=self.reward_model, teachers=self.teachers)

    async def start_agent_endpoint(self) -> None:
        from rollout_server.agent_endpoint import AgentEndpoint

        endpoint = AgentEndpoint(self.episode_context(), host=self.agent_host,
                                 tool_format=self.facts.task.agent_tool_format)
        self.agent_endpoint = await endpoint.start()
        self.log.info("agent endpoint %s", self.agent_endpoint.base_url)

    def start_episode(self, credit: Credit) -> None:
        ctx = self.episode_context()
        if self.facts.task.agent:
            from rollout_server.agent_episode import AgentRunner

            episode = AgentRunner(ctx, self.agent_endpoint, self.tools).run_group(credit)
        elif self.facts.task.env:
            episode = EpisodeRunner(ctx, self.tools).run_group(credit)
        else:
            episode = run_episode(ctx, credit)
        task = asyncio.create_task(episode, name=f"episode-{credit.lease_id}")
        self.episodes.add(task)
        task.add_done_callback(self._episode_done)

    def _episode_done(self, task: asyncio.Task) -> None:
        self.episodes.discard(task)
        self.wake.set()
        if task.cancelled():
            return
        # the link keeps the group, encoded once; one that cannot go on the wire fails here
        if (e := task.exception() or self.link.add(task.result())) is not None:
            if (died := self.engine_death()) is not None:  # not the episode's failure: not counted
                self.log.warning("episode %s failed with its engine: %s: %s", task.get_name(),
                                 type(e).__name__, e)
                self.failure = self.failure or died
                return
            # a teacher down for less than an engine may take to start (the launcher restarts
            # it): its group is dropped and generated again, not counted as a failure
            if isinstance(e, TeacherError) and e.down_s < self.rcfg.engine.startup_timeout_s:
                return
            self.episode_failures += 1
            why, stops = f"{type(e).__name__}: {e}", self.episode_failures >= MAX_EPISODE_FAILURES
            # the traceback of the failure that stops us: where it was raised (an env's step, ...)
            self.log.error("episode %s failed (%d in a row): %s", task.get_name(),
                           self.episode_failures, why,
                           exc_info=e if stops and self.failure is None else None)
            if isinstance(e, RewardPoolError):
                # the reward cannot be loaded: every later episode fails alike
                self.failure = self.failure or ComponentStopped(str(e))
            elif stops:
                self.failure = self.failure or ComponentStopped(
                    f"{self.episode_failures} episodes failed in a row: {why}")
            return
        self.episode_failures = 0

    # ------------------------------------------------------------------ weight sync
    async def probe_engine(self, version: int) -> None:
        """After a failed sync: an engine that does not generate within ``ENGINE_PROBE_S`` is
        wedged; stop (module docstring)."""
        try:
            return await self.client.health_generate(timeout_s=ENGINE_PROBE_S)
        except EngineError as e:  # refused, no answer in time, a 503: its message says which
            self.engine_failed(version, "/health_generate", e)

    def engine_failed(self, version: int, call: str, e: EngineError) -> None:
        """The engine failed ``call`` after the failed sync of ``version``: stop (a launched
        engine) or report it (attached by URL)."""
        why = (f"engine {self.engine_url} failed {call} after the failed weight sync "
               f"v{version}: {peer_text(e.message)}")
        if self.rcfg.engine.kind == "url":
            self.log.error("%s; attached by URL (rollout.engine.kind=url): restart it yourself",
                           why)
            return
        self.log.error("%s: stopping so that this server restarts with a fresh engine", why)
        self.wedged = True
        self.failure = self.failure or ComponentStopped(why)

    # ------------------------------------------------------------------ evaluation
    def maybe_evaluate(self) -> None:
        if (self.evaluator is None or self.eval_task is not None or self.in_sync()
                or not self.evaluator.schedule.due(self.policy_version)):
            return
        self.eval_task = asyncio.create_task(self.evaluate(), name="evaluate")
        self.eval_task.add_done_callback(self._evaluation_done)

    async def evaluate(self) -> None:
        """Refuse the trainer's syncs (``begin``), let one under way end, evaluate the version
        the engine serves, take syncs again (ROLLOUT.md, "Evaluation")."""
        self.evaluating = True
        try:
            await self.heartbeat()  # from its answer on, the roster leaves us out
            while self.in_sync():
                await asyncio.sleep(LOOP_TICK_S)
            await self.read_engine_version()
            self.eval_version = self.policy_version
            record = await self.evaluator.run(self.client, self.eval_version, self.max_input)
            self.log.info("eval v%d: %s", self.eval_version,
                          {k: v for k, v in record.items() if k not in ("time", "policy_version")})
        finally:
            self.evaluating, self.eval_version = False, None
        await self.heartbeat()

    def _evaluation_done(self, task: asyncio.Task) -> None:
        self.eval_task = None
        self.wake.set()
        if not task.cancelled() and (e := task.exception()) is not None:
            self.failure = self.failure or ComponentStopped(f"evaluation failed: {e!r}")

    async def episodes_idle(self) -> None:
        while self.episodes:
            await asyncio.wait(set(self.episodes))

    # ------------------------------------------------------------------ the trainer's sync calls
    async def open_sync_port(self) -> None:
        """Where the trainer driving our engine's weight syncs asks for its door, says when a
        sync begins and ends (sync_port.py): on the engine's host, behind the job's engine key."""
        self.sync_port = SyncPort(self.facts.engine_key, self.server_id, self.engine_url,
                                  incarnation=self.incarnation, rendezvous=self.facts.rendezvous,
                                  door=self.door,
                                  begin=self.begin, adapter=self.load_adapter, end=self.end)
        self.sync_url = await self.sync_port.start(urlparse(self.engine_url).hostname,
                                                   self.rcfg.sync_port)
        self.metrics.count_refusals("sync", self.sync_port.unauthorized)
        self.log.info("sync port %s", self.sync_url)

    def in_sync(self) -> bool:
        return time.monotonic() < self.sync_until

    def sync_under_way(self, plan_id: str) -> None:
        """SyncRefused unless ``plan_id``'s sync began here and has not ended (nor run out)."""
        if plan_id != self.sync_plan or not self.in_sync():
            raise SyncRefused(f"plan {plan_id} is not the weight sync under way here")

    async def begin(self, body: BeginBody) -> bool:
        """The trainer's sync of ``body.version`` to our engine begins: no lease is asked for and
        no evaluation begins until its ``end``, or for ``body.seconds`` (the trainer's deadline)
        and the engine's continue after it; with rollout.drain_on_update, True once the episodes
        in flight ended (``DRAIN_SHARE`` of ``seconds`` at most: then the engine's pause cuts
        them, and they resume after it). Refused while evaluating, and while the engine of a sync
        the trainer abandoned is being continued (that would land in this one)."""
        if self.evaluating:
            raise SyncRefused(f"evaluating version {self.policy_version}")
        if self.resuming is not None and not self.resuming.done():
            raise SyncRefused(f"still ending the abandoned sync of v{self.sync_version}")
        seconds = body.seconds
        self.sync_until = time.monotonic() + seconds + CONTINUE_TIMEOUT_S
        self.sync_version, self.sync_plan = body.version, body.plan_id
        self.syncs_begun += 1
        if not self.rcfg.drain_on_update:
            return False
        try:
            await asyncio.wait_for(self.episodes_idle(), seconds * DRAIN_SHARE)
        except asyncio.TimeoutError:
            self.log.warning("drain did not finish within %.1fs; the pause cuts the remaining "
                             "requests instead", seconds * DRAIN_SHARE)
            return False
        return True

    def door(self, body: DoorBody) -> int:
        """A door beside our engine to the group's store gate (``open_door``)."""
        self.sync_under_way(body.plan_id)
        return open_door(self.engine_url, self.facts.engine_key, body.master_addr,
                         body.master_port, body.group_name)

    async def load_adapter(self, plan: WeightSyncPlan) -> SyncDone:
        """LoRA on a launched engine: the trainer's sync loads the adapter through us, as our
        generate calls name it."""
        self.sync_under_way(plan.plan_id)
        return await apply_adapter_sync(self.client, plan, self.server_id,
                                        pause_mode=self.rcfg.pause_mode)

    def end(self, body: EndBody) -> None:
        """The trainer's sync of ``body.version`` ended; after a failed one the engine is
        probed. Refused for any plan but the one under way (a late end of an earlier sync)."""
        if body.plan_id != self.sync_plan:
            raise SyncRefused(f"plan {body.plan_id} is not the weight sync under way here")
        version, ok, pause_s, reason = body.version, body.ok, body.pause_s, body.reason
        self.sync_until, self.sync_plan = 0.0, ""
        self.wake.set()
        self.metrics.histogram("rollout/weight_sync_pause_seconds",
                               "engine pause per weight update",
                               buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)).observe(
                                   pause_s)
        level = (logging.WARNING if not ok else logging.DEBUG if version % SYNC_INFO_EVERY
                 else logging.INFO)
        self.log.log(level, "weight sync v%d %s in %.2fs pause%s", version, "done" if ok
                     else "FAILED", pause_s, f": {peer_text(reason)}" if reason else "")
        # ok: the buffer learns the engine's new label at once (a heartbeat), then we ask for
        # leases (at eta 0 they wait for the engine's version); failed: does it still generate?
        task = asyncio.create_task(self.after_load() if ok else self.probe_engine(version),
                                   name=f"after-v{version}")
        self.after_sync.add(task)
        task.add_done_callback(self.after_sync.discard)

    def end_abandoned_sync(self) -> None:
        """A sync that began and never ended by its deadline (the trainer died or gave up during
        it): its engine may be left paused; continue it and check that it still generates."""
        if not self.sync_plan or self.in_sync():
            return
        self.sync_plan = ""
        self.log.warning("weight sync v%d began and never ended: continuing the engine and "
                         "probing it", self.sync_version)
        task = self.resuming = asyncio.create_task(self.resume_abandoned(self.sync_version),
                                                   name="abandoned")
        self.after_sync.add(task)
        task.add_done_callback(self.after_sync.discard)

    async def resume_abandoned(self, version: int) -> None:
        """Close a session it left open (it refuses the next sync), continue it, probe it; an
        engine that does not answer one of these calls within ``ENGINE_PROBE_S`` is wedged as
        one that fails the probe (each further call would wait as long again: 90 s in all)."""
        for call in (self.client.end_weight_update, self.client.continue_generation):
            try:
                await call(timeout_s=ENGINE_PROBE_S)
            except EngineError as e:
                if e.status is None:  # no answer (none in time, or the connection refused)
                    return self.engine_failed(version, e.endpoint, e)
        await self.probe_engine(version)

    async def after_load(self) -> None:
        await self.read_engine_version()
        await self.heartbeat()
        self.link.window_moved()
        self.wake.set()


def _raise_if_done(tasks: list[asyncio.Task]) -> None:
    for t in tasks:
        if t.done():
            exc = None if t.cancelled() else t.exception()
            if isinstance(exc, StartRefused):  # e.g. another process took our id: exit 2
                raise exc
            raise ComponentStopped(f"background task {t.get_name()!r} ended: {exc!r}")
