"""What the trainer needs to know about the rest of the job, beyond its own ``trainer`` section.

``TrainerFacts.from_run(cfg)`` is the one place that reads other sections of the run config for
the trainer, and resolves paths against ``run_dir``. Security is resolved here once: rank 0's
CURVE keys for the buffer (``keys``; None: plain sockets) and the engine API key for the log-prob
guard (``engine_key``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from areal_like.job_facts import trajectory_limit
from areal_like.net.auth import engine_api_key
from areal_like.net.security import Keys
from areal_like.settings.config import (
    EvalConfig,
    ExportConfig,
    ModelConfig,
    RunConfig,
    TaskConfig,
)
from areal_like.settings.distill_schema import DistillConfig


@dataclass(frozen=True)
class TrainerFacts:
    model: ModelConfig  # the policy's (and reference's) architecture or weights, and the tokenizer
    # the engines' sampling (temperature, top-p/k, max_new_tokens), the chat template exports carry
    task: TaskConfig
    export: ExportConfig  # in-run exports: when and in what shards
    eval: EvalConfig  # eval.*: written beside each export, for `areal-like eval` away from the run
    seed: int  # torch's seed for this process
    # buffer.max_staleness: the consume-time bound every batch is checked against
    max_staleness: int
    # eval.final_timeout_s: how long the last push waits for an evaluating server
    final_eval_timeout_s: float
    # eval.await_server: the last push waits for a server that evaluates to register
    final_eval: bool
    sample_every: int  # tracking.sample_every: a sample table every this many steps (0: never)
    sample_k: int  # tracking.sample_k: trajectories in one sample table
    run_dir: Path  # where metrics/trainer.jsonl and samples.jsonl go
    checkpoint_dir: Path  # trainer.checkpoint_dir resolved against run_dir
    export_dir: Path  # export.dir resolved against run_dir
    # the most prompt and output tokens of a trajectory (a longer one is dropped; 0: unchecked)
    context: int = 0
    nodes: int = 1  # launch.nodes: > 1 puts the engines on other nodes than rank 0 (log-prob guard)
    keys: Keys | None = None  # the trainer client's CURVE keys (None: plain sockets)
    # with LoRA, the path the engine kind loads an adapter from: what weight_sync.path=auto is
    # when no `areal-like run` resolved it (a trainer started by hand), as placement's auto_path
    adapter_path: str | None = None
    # the job's engine API key (auth.engine_api_key; None only in facts a test builds); never in a
    # repr, a log line or a traceback's locals, like Keys.secret
    engine_key: str | None = field(default=None, repr=False)
    engine_kind: str = "sglang"  # rollout.engine.kind: the protocol the trainer drives it by
    pause_mode: str = "retract"  # rollout.pause_mode: how a weight sync pauses each engine
    distill: DistillConfig | None = None  # distill: the teachers' weight in the advantages

    @classmethod
    def from_run(cls, cfg: RunConfig, keys: Keys | None = None) -> TrainerFacts:
        """The facts of the job ``cfg`` describes; its buffer clients are CURVE clients with
        ``keys``."""
        return cls(model=cfg.model, task=cfg.task, export=cfg.export, eval=cfg.eval, seed=cfg.seed,
                   max_staleness=cfg.buffer.max_staleness,
                   final_eval_timeout_s=cfg.eval.final_timeout_s,
                   final_eval=cfg.eval.await_server,
                   sample_every=cfg.tracking.sample_every, sample_k=cfg.tracking.sample_k,
                   run_dir=Path(cfg.run_dir),
                   checkpoint_dir=cfg.resolve_path(cfg.trainer.checkpoint_dir),
                   export_dir=cfg.resolve_path(cfg.export.dir), nodes=cfg.launch.nodes, keys=keys,
                   engine_key=engine_api_key(cfg.run_dir), context=trajectory_limit(cfg),
                   adapter_path=cfg.adapter_path, engine_kind=cfg.rollout.engine.kind,
                   pause_mode=cfg.rollout.pause_mode,
                   distill=cfg.distill if cfg.distill.enabled else None)
