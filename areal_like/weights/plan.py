"""A weight sync's plan and a member's answer: what the trainer's side of a push
(areal_like/weights/push.py) and the rollout server's side (areal_like/weights/server_sync.py)
share. The types live in the trainer's process and never cross ZeroMQ; a plan is the JSON body of
a sync port's ``/adapter`` (rollout_server/sync_port.py). The protocol: trainer/WEIGHT_SYNC.md.

Invariant: ``plan_buckets`` is deterministic and gives each bucket one dtype (so the offsets of
the flattened-bucket format, areal_like/wire/weight_wire.py, are aligned).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Annotated

import msgspec

from areal_like.engines.client import EngineClient, EngineError
from areal_like.wire.codec import Finite, Message, ProtocolError
from areal_like.wire.protocol import MAX_GROUP_RANKS, Ranks, ServerId

log = logging.getLogger(__name__)

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]  # 0: none (a plan of a path without a group)
# continue runs even after the deadline passed; it must not wait forever either
CONTINUE_TIMEOUT_S = 30.0
# the engine kinds a rollout server starts as a process of its own (with LoRA: they load the
# adapter alone, ``server_sync.apply_adapter_sync``)
LAUNCHED = ("sglang", "vllm")
# the disk path's pushes: <tmp>/<ROOT_PREFIX><the trainer's pid>_<random>/<one push> (its
# DiskSender, trainer/weight_local.py)
ROOT_PREFIX = "areal_like_weights_"
ITEMSIZE = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4,
            "int16": 2, "int8": 1, "uint8": 1, "bool": 1}


class SyncMember(Message, tag="sync_member"):
    server_id: ServerId
    # engine TP rank t is group rank rank_offset + t
    rank_offset: Annotated[int, msgspec.Meta(ge=0, le=MAX_GROUP_RANKS - 1)]


class BucketSpec(Message, tag="bucket_spec"):
    """Tensors broadcast together, in this order (SGLang update_weights_from_distributed)."""

    names: list[str]
    dtypes: list[str]  # torch dtype names without "torch." (e.g. "float32")
    shapes: list[list[int]]

    def validate(self) -> None:
        if not (len(self.names) == len(self.dtypes) == len(self.shapes)):
            raise ProtocolError("names, dtypes and shapes differ in length", "names")


# How the weights of a plan travel (``WeightSyncPlan.path``) -> the payloads its plan carries, given
# its buckets: "distributed" (the group), "tensor" (one shared-memory payload per bucket), "disk"
# (one directory). The trainer's senders and the engine's receivers are keyed by these.
WEIGHT_PATHS = {"distributed": lambda buckets: 0, "tensor": len, "disk": lambda buckets: 1}


class WeightSyncPlan(Message):
    """How version ``policy_version`` is pushed to its members' engines (trainer/weight_sync.py,
    driven by trainer/engine_drive.py)."""

    policy_version: int
    group_name: str
    master_addr: str
    master_port: Port
    world_size: Ranks
    backend: str  # "gloo" | "nccl"
    reform: bool  # members must (re)join the group before receiving
    members: list[SyncMember]
    buckets: list[BucketSpec]
    deadline_s: Finite  # the whole sync, from the plan's start
    plan_id: str = ""  # unique per push attempt: a re-push of the same version is a new plan
    path: str = "distributed"  # WEIGHT_PATHS; a str: an unknown one fails the member's sync
    payloads: list[str] = []  # WEIGHT_PATHS[path](buckets) of them

    def validate(self) -> None:
        count = WEIGHT_PATHS.get(self.path)
        want = count(self.buckets) if count is not None else None
        if want is not None and len(self.payloads) != want:
            raise ProtocolError(f"path {self.path} needs {want} payload(s), "
                                f"got {len(self.payloads)}", "payloads")
        if self.path == "distributed" and self.master_port == 0:
            raise ProtocolError("the distributed path needs the group's port", "master_port")


class SyncDone(Message):
    """One member's result of a ``WeightSyncPlan``."""

    server_id: ServerId
    policy_version: int
    ok: bool
    reason: str = ""
    pause_s: Finite = 0.0  # how long the engine was not generating
    plan_id: str = ""  # the plan answered


def plan_buckets(named_shapes_dtypes: list[tuple[str, list[int], str]],
                 bucket_bytes: int) -> list[BucketSpec]:
    """Buckets of at most ``bucket_bytes`` (a larger tensor alone), one dtype each, dtypes in order
    of first occurrence and tensors in order within a dtype."""
    by_dtype: dict[str, list[tuple[str, list[int]]]] = {}
    for name, shape, dt in named_shapes_dtypes:
        if dt not in ITEMSIZE:
            raise ValueError(f"{name}: unsupported dtype {dt!r}")
        by_dtype.setdefault(dt, []).append((name, [int(s) for s in shape]))
    groups: list[tuple[list, str]] = []  # (name, shape) per tensor, and the dtype, per bucket
    for dt, items in by_dtype.items():
        cur: list[tuple[str, list[int]]] = []
        cur_bytes = 0
        for name, shape in items:
            nbytes = ITEMSIZE[dt] * math.prod(shape)
            if cur and cur_bytes + nbytes > bucket_bytes:
                groups.append((cur, dt))
                cur, cur_bytes = [], 0
            cur.append((name, shape))
            cur_bytes += nbytes
        if cur:
            groups.append((cur, dt))
    return [BucketSpec(names=[n for n, _ in items], dtypes=[dt] * len(items),
                       shapes=[s for _, s in items]) for items, dt in groups]


def answer(plan: WeightSyncPlan, server_id: str, reason: str, pause_s: float = 0.0) -> SyncDone:
    """This server's report of ``plan``: loaded when there is no ``reason`` it failed."""
    return SyncDone(server_id=server_id, policy_version=plan.policy_version, plan_id=plan.plan_id,
                    ok=not reason, reason=reason, pause_s=pause_s)


class Deadline:
    """What is left of a plan's ``deadline_s`` for the next engine call."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("weight sync deadline passed")
        return left


async def resume(client: EngineClient, reason: str) -> str:
    """Continue the engine's generation after a sync; ``reason`` with the failure added if not."""
    try:
        await client.continue_generation(timeout_s=CONTINUE_TIMEOUT_S)
    except EngineError as e:
        log.error("could not continue generation after a weight sync: %s", e)
        reason = "; ".join(r for r in (reason, f"continue failed: {e}") if r)
    return reason
