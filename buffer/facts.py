"""What the buffer needs to know about the rest of the job: ``BufferFacts.from_run(cfg)`` is the one
place that reads other sections of the run config for the buffer (paths resolved against
``run_dir``, CURVE keys included)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from areal_like.job_facts import (
    dataset_size,
    group_trajectories,
    model_routes,
    model_vocab_size,
    request_frame_limit,
    trajectory_limit,
)
from areal_like.net.security import Keys
from areal_like.settings.config import RunConfig
from areal_like.tasks.task import prompt_layout

MIN_SERVERS = 8  # buffer/peer_caps.py: the roster allowance of one member key, at least


def max_servers(cfg: RunConfig) -> int:
    """Server ids one member key may have on the roster: twice the rollout servers the job
    launches on every rollout node (null counts one), at least ``MIN_SERVERS``; also the most
    rollout servers ``areal-like scale`` may grow a pool to (launch/scale.py)."""
    la = cfg.launch
    nodes = la.nodes - la.train_nodes if la.nodes > 1 else 1
    return max(MIN_SERVERS, 2 * (la.num_rollout_servers or 1) * nodes)


@dataclass(frozen=True)
class BufferFacts:
    vocab_size: int  # model: token ids outside [0, vocab_size) are refused
    context: int  # model: a trajectory with more prompt and output tokens is refused
    trajectories: int  # task: a group with more trajectories is refused
    dataset_size: int  # task + model: prompts in one epoch, the ledger's cursor range
    engine_lag: int  # trainer.weight_sync.engine_lag: versions engines may lag by design
    # task + model (or buffer.max_frame_bytes): bigger request frames are refused undecoded
    frame_limit: int
    wal_dir: Path  # buffer.wal_dir resolved against run_dir
    # buffer.local_dir resolved against run_dir: same-node ipc:// sockets (None: none)
    local_dir: Path | None
    # server ids one member key may have on the roster (buffer/peer_caps.py)
    max_servers: int = MIN_SERVERS
    # the task's prompt encoding (areal_like.tasks.task.prompt_layout): logged
    prompt_layout: str = ""
    keys: Keys | None = None  # the server's CURVE keys (None: plain sockets)
    # model, trainer.routing_replay: (layers, top_k, experts) of a token's routes, which must
    # match (None: unchecked)
    routes: tuple[int, int, int] | None = None

    @classmethod
    def from_run(cls, cfg: RunConfig, keys: Keys | None = None) -> BufferFacts:
        """The facts of the job ``cfg`` describes (reads the task's dataset to count its
        prompts)."""
        b = cfg.buffer
        return cls(vocab_size=model_vocab_size(cfg.model), context=trajectory_limit(cfg),
                   trajectories=group_trajectories(cfg.task),
                   frame_limit=request_frame_limit(cfg),
                   engine_lag=cfg.trainer.weight_sync.engine_lag,
                   dataset_size=dataset_size(cfg.task, cfg.model),
                   wal_dir=cfg.resolve_path(b.wal_dir),
                   local_dir=cfg.resolve_path(b.local_dir) if b.local_dir else None,
                   max_servers=max_servers(cfg), prompt_layout=prompt_layout(cfg.task), keys=keys,
                   routes=model_routes(cfg))
