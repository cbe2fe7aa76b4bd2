"""What a run directory already holds, read before ``areal-like run`` starts anything in it.

Running the same command twice with the same ``run_dir`` continues that run: the trainer resumes
from its latest checkpoint and the buffer recovers its write-ahead log. ``check_existing_run(cfg)``
decides, before the warm start and before any daemon, whether that makes sense:

* no complete checkpoint: a fresh start (step 0);
* a checkpoint below ``trainer.steps``: resume from it (the step is returned and announced);
* a checkpoint at or past ``trainer.steps``: the run is finished; refused with one line saying how
  to continue (raise ``trainer.steps``) or start over (a new ``run_dir``);
* checkpoints with ``trainer.resume=false``: refused, since a fresh trainer would mix its versions
  with the old run's WAL, metrics and checkpoints;
* a job still running in it (its supervisor alive): refused, two jobs would share one WAL.

Only names and files are read (the ``v%08d`` checkpoint layout of trainer/checkpoint.py, and
ports.json): no torch import, so a refusal is instant.
"""

from __future__ import annotations

import json
from pathlib import Path

import psutil

from areal_like.config import ConfigError, RunConfig

CHECKPOINT_PREFIX = "v"  # trainer/checkpoint.py PREFIX: v00000012 holds policy_version 12
CHECKPOINT_DONE = "meta.pt"  # written last into a checkpoint directory before its atomic rename


def latest_checkpoint_step(checkpoint_dir: Path) -> int | None:
    """The policy version of the newest complete checkpoint under ``checkpoint_dir``, or None."""
    if not checkpoint_dir.is_dir():
        return None
    steps = [int(p.name[len(CHECKPOINT_PREFIX):]) for p in checkpoint_dir.iterdir()
             if p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit()
             and (p / CHECKPOINT_DONE).is_file()]
    return max(steps, default=None)


def live_supervisor(run_dir: Path) -> int | None:
    """PID of the ``areal-like run`` that still runs a job in ``run_dir`` (from its ports.json)."""
    ports = run_dir / "ports.json"
    try:
        pid = int(json.loads(ports.read_text())["supervisor_pid"])
        written = ports.stat().st_mtime
        proc = psutil.Process(pid)
        # a PID recycled after that job ended belongs to a process created after its last write
        return pid if proc.create_time() <= written + 1.0 and proc.status() != psutil.STATUS_ZOMBIE else None
    except (OSError, ValueError, KeyError, TypeError, psutil.Error):
        return None


def check_existing_run(cfg: RunConfig) -> int:
    """The step this invocation starts from (0 = fresh); raises ConfigError when it must not start."""
    run_dir = Path(cfg.run_dir).resolve()
    pid = live_supervisor(run_dir)
    if pid is not None:
        raise ConfigError(f"run_dir {run_dir} is in use by a running job (areal-like run pid {pid}): "
                          "wait for it, stop it, or use a new run_dir")
    step = latest_checkpoint_step(cfg.resolve_path(cfg.trainer.checkpoint_dir))
    if step is None:
        return 0
    if step >= cfg.trainer.steps:
        raise ConfigError(f"run_dir {run_dir} already finished at step {step} (trainer.steps={cfg.trainer.steps}): "
                          "raise trainer.steps to continue, or use a new run_dir")
    if not cfg.trainer.resume:
        raise ConfigError(f"run_dir {run_dir} holds a checkpoint at step {step} but trainer.resume=false: "
                          "use a new run_dir (or trainer.resume=true to continue it)")
    return step
