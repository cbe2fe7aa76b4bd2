"""What a rollout server needs to know about the rest of the job, beyond its own ``rollout`` section.

``RolloutFacts.from_run(cfg)`` is the one place that reads other sections of the run config for a
rollout server; the server and its evaluator see only ``RolloutConfig`` and these facts. The model
and the task are shared knowledge (the trainer and the buffer read the same ones), so they come
whole; of the trainer's section only the number of steps and the LoRA layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from areal_like.config import EvalConfig, LoraConfig, ModelConfig, RunConfig, TaskConfig


@dataclass(frozen=True)
class RolloutFacts:
    model: ModelConfig  # the engine's weights (or architecture) and the tokenizer
    task: TaskConfig  # prompts, sampling, rewards and multi-turn episodes: what the server generates
    eval: EvalConfig  # what rollout.eval evaluates, and how often
    steps: int  # trainer.steps: the last policy version, which gets the final evaluation
    run_dir: Path  # where the SGLang log (logs/) and the eval records (eval.jsonl) go
    # trainer.lora: the adapter layout the engine's weight updates fill
    lora: LoraConfig = field(default_factory=LoraConfig)

    @classmethod
    def from_run(cls, cfg: RunConfig) -> RolloutFacts:
        """The facts of the job ``cfg`` describes."""
        return cls(model=cfg.model, task=cfg.task, eval=cfg.eval, steps=cfg.trainer.steps,
                   run_dir=Path(cfg.run_dir), lora=cfg.trainer.lora)
