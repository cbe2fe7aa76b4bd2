"""What a rollout server needs to know about the rest of the job, beyond its own ``rollout``
section.

``RolloutFacts.from_run(cfg)`` is the one place that reads other sections of the run config for a
rollout server: the model and the task whole (shared knowledge), of the trainer only its steps,
its LoRA layout, whether its log-prob guard probes the engines, whether it replays routes and the
address of its weight group's rendezvous (the only one a door leads to), the teachers it asks
(``distill``); and
the security resolved once at start: the CURVE ``keys`` (None: plain sockets) and the job's engine
API key, never in a repr.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from areal_like.job_facts import trajectory_limit
from areal_like.net.auth import engine_api_key
from areal_like.net.security import Keys
from areal_like.settings.config import EvalConfig, LoraConfig, ModelConfig, RunConfig, TaskConfig
from areal_like.settings.distill_schema import DistillConfig


@dataclass(frozen=True)
class RolloutFacts:
    model: ModelConfig  # the engine's weights (or architecture) and the tokenizer
    # prompts, sampling, rewards and multi-turn episodes: what the server generates
    task: TaskConfig
    eval: EvalConfig  # what rollout.eval evaluates, and how often
    steps: int  # trainer.steps: the last policy version, which gets the final evaluation
    run_dir: Path  # where the SGLang log (logs/) and the eval records (eval.jsonl) go
    # trainer.lora: the adapter layout the engine's weight updates fill
    lora: LoraConfig = field(default_factory=LoraConfig)
    keys: Keys | None = None  # the rollout client's CURVE keys (None: plain sockets)
    # the job's engine API key (auth.engine_api_key; None only in facts a test builds); never in a
    # repr, a log line or a traceback's locals, like Keys.secret
    engine_key: str | None = field(default=None, repr=False)
    seed: int = 0  # the job's seed: its evaluations' sampling seeds come from it
    # prompt and output tokens the engine serves (job_facts.served_context; 0: unbounded)
    context: int = 0
    # launch.nodes: > 1 puts trainer rank 0 (whose log-prob guard probes the engine) elsewhere
    nodes: int = 1
    # trainer.routing_replay: every /generate asks for the experts it routed each token to
    routed_experts: bool = False
    # trainer.weight_sync.master_addr and master_port (0: a free one per group): where the sync
    # port's doors may lead (sync_port.py)
    rendezvous: tuple[str, int] = ("127.0.0.1", 0)
    distill: DistillConfig = field(default_factory=DistillConfig)  # the teachers (teacher.py)

    @classmethod
    def from_run(cls, cfg: RunConfig, keys: Keys | None = None) -> RolloutFacts:
        """The facts of the job ``cfg`` describes; its ZeroMQ sockets are CURVE clients with
        ``keys``. An episode ends where the engine's context does, if that comes before
        ``task.max_episode_tokens`` (the engine refuses a longer input)."""
        context = trajectory_limit(cfg)
        room = min(cfg.task.max_episode_tokens, context)
        return cls(model=cfg.model, task=replace(cfg.task, max_episode_tokens=room),
                   eval=cfg.eval, steps=cfg.trainer.steps, context=context,
                   run_dir=Path(cfg.run_dir), lora=cfg.trainer.lora, keys=keys,
                   engine_key=engine_api_key(cfg.run_dir), seed=cfg.seed,
                   nodes=cfg.launch.nodes, routed_experts=cfg.trainer.routing_replay,
                   rendezvous=(cfg.trainer.weight_sync.master_addr,
                               cfg.trainer.weight_sync.master_port),
                   distill=cfg.distill)
