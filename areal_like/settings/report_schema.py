"""The ``eval``, ``export`` and ``tracking`` sections of the schema (``schema.py`` composes
them into ``RunConfig``): each validates itself, a bad value raises ``ConfigError`` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass

from areal_like.settings.config_checks import check as _check
from areal_like.settings.config_checks import choice as _choice
from areal_like.settings.config_checks import each


@dataclass(kw_only=True)
class EvalConfig:
    """Evaluation on the eval split by a rollout server's engine at a known version;
    correct = reward 1."""

    # evaluate each time the policy version reaches a multiple of this; 0 = never during the run
    every: int = 0
    at_start: bool = True  # with every > 0: also the initial weights (version 0), the baseline
    at_end: bool = True  # and once at trainer.steps
    max_examples: int = 0  # eval prompts used (first N of the split); 0 = all
    # samples per prompt at the sampling temperature, for pass@k and mean@k; 0 = greedy only
    k: int = 4
    temperature: float | None = None  # None = task.temperature
    max_new_tokens: int | None = None  # None = task.max_new_tokens
    # how long `areal-like run` waits for the final eval after training
    final_timeout_s: float = 600.0
    # The trainer's last push also waits (final_timeout_s at most) for a server that evaluates to
    # register, so one that started late still gets the final weights; `areal-like run` sets it on
    # the trainer's command line when it starts such a server (launch/job.py).
    await_server: bool = False

    def __post_init__(self):
        each("eval", self, ">= 0", "every", "max_examples", "k")
        _check("eval.temperature", self.temperature is None or self.temperature > 0,
               "null or > 0 (greedy is always measured)", self.temperature)
        _check("eval.max_new_tokens", self.max_new_tokens is None or self.max_new_tokens >= 1,
               "null or >= 1", self.max_new_tokens)


@dataclass(kw_only=True)
class ExportConfig:
    """Hugging Face model directories written by the trainer (``areal-like export`` does the same
    offline)."""

    # export each time the policy version reaches a multiple of this; 0 = never during the run
    every: int = 0
    at_end: bool = True  # and once when training ends
    dir: str = "export"  # relative to run_dir unless absolute; one v<version> directory per export
    shard_mb: int = 2048  # largest model.safetensors shard
    keep: int = 0  # in-run exports kept, the newest (older ones deleted after each export); 0 = all
    # LoRA (trainer.lora.rank > 0): an export is the adapter (PEFT layout); true: also
    # v<version>/merged, a plain Hugging Face model with the adapter folded into the base (needed
    # by a model built from its config: its adapter has no base directory to name)
    merged: bool = False

    def __post_init__(self):
        each("export", self, ">= 0", "every", "keep")
        each("export", self, ">= 1", "shard_mb")


TRACKERS = ("jsonl", "tensorboard", "wandb", "mlflow", "trackio")


@dataclass(kw_only=True)
class TrackingConfig:
    """Where metrics, eval results and sample tables go besides the run directory's JSONL files."""

    project: str = "areal-like"  # the trackers' project (wandb, mlflow experiment, trackio)
    run_name: str = ""  # empty = the run directory's name
    # [tracker wandb only]
    # online | offline (offline needs no network; `wandb sync` uploads later)
    wandb_mode: str = "offline"
    sample_every: int = 10  # every N trainer steps, a table of samples; 0 = never
    sample_k: int = 8  # samples per table

    def __post_init__(self):
        _choice("tracking.wandb_mode", self.wandb_mode, ("online", "offline"))
        each("tracking", self, ">= 0", "sample_every")
        each("tracking", self, ">= 1", "sample_k")

