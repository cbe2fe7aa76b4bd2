"""The ``eval``, ``export`` and ``tracking`` sections of the schema (``schema.py`` composes
them into ``RunConfig``): each validates itself, a bad value raises ``ConfigError`` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from areal_like.settings.config_checks import Section, above, at_least, one_of


@dataclass(kw_only=True)
class EvalConfig(Section):
    """Evaluation on the eval split by a rollout server's engine at a known version;
    correct = reward 1."""

    key = "eval"

    # evaluate each time the policy version reaches a multiple of this; 0 = never during the run
    every: Annotated[int, at_least(0)] = 0
    at_start: bool = True  # with every > 0: also the initial weights (version 0), the baseline
    at_end: bool = True  # and once at trainer.steps
    # eval prompts used (first N of the split); 0 = all
    max_examples: Annotated[int, at_least(0)] = 0
    # samples per prompt at the sampling temperature, for pass@k and mean@k; 0 = greedy only
    k: Annotated[int, at_least(0)] = 4
    # None = task.temperature
    temperature: Annotated[float | None, above(0, " (greedy is always measured)")] = None
    max_new_tokens: Annotated[int | None, at_least(1)] = None  # None = task.max_new_tokens
    # how long `areal-like run` waits for the final eval after training
    final_timeout_s: float = 600.0
    # The trainer's last push also waits (final_timeout_s at most) for a server that evaluates to
    # register, so one that started late still gets the final weights; `areal-like run` sets it on
    # the trainer's command line when it starts such a server (launch/job.py).
    await_server: bool = False


@dataclass(kw_only=True)
class ExportConfig(Section):
    """Hugging Face model directories written by the trainer (``areal-like export`` does the same
    offline)."""

    key = "export"

    # export each time the policy version reaches a multiple of this; 0 = never during the run
    every: Annotated[int, at_least(0)] = 0
    at_end: bool = True  # and once when training ends
    dir: str = "export"  # relative to run_dir unless absolute; one v<version> directory per export
    shard_mb: Annotated[int, at_least(1)] = 2048  # largest model.safetensors shard
    # in-run exports kept, the newest (older ones deleted after each export); 0 = all
    keep: Annotated[int, at_least(0)] = 0
    # LoRA (trainer.lora.rank > 0): an export is the adapter (PEFT layout); true: also
    # v<version>/merged, a plain Hugging Face model with the adapter folded into the base (needed
    # by a model built from its config: its adapter has no base directory to name)
    merged: bool = False


TRACKERS = ("jsonl", "tensorboard", "wandb", "mlflow", "trackio")


@dataclass(kw_only=True)
class TrackingConfig(Section):
    """Where metrics, eval results and sample tables go besides the run directory's JSONL files."""

    key = "tracking"

    project: str = "areal-like"  # the trackers' project (wandb, mlflow experiment, trackio)
    run_name: str = ""  # empty = the run directory's name
    # [tracker wandb only]
    # online | offline (offline needs no network; `wandb sync` uploads later)
    wandb_mode: Annotated[str, one_of("online", "offline")] = "offline"
    # every N trainer steps, a table of samples; 0 = never
    sample_every: Annotated[int, at_least(0)] = 10
    sample_k: Annotated[int, at_least(1)] = 8  # samples per table

