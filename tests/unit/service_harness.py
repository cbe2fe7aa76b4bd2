"""The buffer service's real request handling, driven in-process: fake sockets that record what
the service sends, a real WAL in ``tmp_path``, an optional fake clock. Shared by the unit tests
of the hand-out, admission, leases and disk-full behaviour."""

from __future__ import annotations

from collections.abc import Callable

from areal_like.settings.config import BufferConfig, RunConfig, TaskConfig
from areal_like.wire import protocol as P
from areal_like.wire.trajectory import Trajectory, as_f32, as_i32
from buffer.service import BufferService


class Clock:
    """A fake clock for the service (``start(clock=...)``) or a ControlPlane: ``t`` moves when a
    test sets it."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Sink:
    """Stands for the ROUTER and the PUB socket: keeps every message sent or published, as its
    receiver decodes it (a Batch's groups leave as their stored frames)."""

    def __init__(self):
        self.sent: list[P.Message] = []
        self.frames: list[bytes] = []  # as they went on the wire

    def send(self, peer, req_id, msg):
        self.frames.append(P.encode(msg))
        self.sent.append(P.decode(self.frames[-1]))

    def publish(self, msg):
        self.send(b"", b"", msg)

    def close(self):
        pass


def start(tmp_path, buffer: BufferConfig, *, clock: Callable[[], float] | None = None,
          before_recover: Callable[[BufferService], None] | None = None) -> BufferService:
    """A recovered service over 100 prompts with ``buffer``'s settings, its sockets replaced by
    sinks."""
    cfg = RunConfig(run_dir=str(tmp_path), task=TaskConfig(num_prompts=100), buffer=buffer)
    svc = BufferService.from_run(cfg) if clock is None else BufferService.from_run(cfg, clock=clock)
    if before_recover is not None:
        before_recover(svc)
    svc.recover()
    svc.server, svc.publisher = Sink(), Sink()
    return svc


def step(svc: BufferService, msg: P.Message, peer: bytes = b"trainer-ws-test") -> P.Message:
    """Handle ``msg`` from ``peer`` as the loop would (settle, wait until durable, send); the
    reply."""
    frame = P.encode(msg)
    svc.handle(peer, b"req", P.decode(frame), frame)
    svc.settle()
    svc.wal.wait_durable()
    svc.send_durable()
    return svc.server.sent[-1]


def answer(credit: P.Credit, version: int = 0, server_id: str = "s") -> P.TrajectoryGroup:
    """The group a server sends for ``credit``: one trajectory of two tokens, sampled at
    ``version``, reward 1."""
    t = Trajectory.of(prompt_ids=as_i32([1]), output_ids=as_i32([2, 3]),
                      behav_logp=as_f32([-1, -1]), versions=as_i32([version, version]),
                      reward=1.0, finish_reason="stop")
    return P.TrajectoryGroup(group_id=f"{server_id}-{credit.lease_id}", server_id=server_id,
                             lease_id=credit.lease_id, prompt_index=credit.prompt_index,
                             epoch=credit.epoch, trajectories=[t])
