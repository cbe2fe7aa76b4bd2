"""The Python entry point: ``areal-like run`` from a script or a notebook.

    from launch import config, run

    summary = run("experiment=quickstart", "trainer.steps=20")   # Hydra overrides, as on the CLI
    cfg = config("experiment=quickstart")                        # or a config built in Python
    summary = run(dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, lr=1e-3)))

``run`` is the CLI's launcher (``launch.job.run_job``; ``launch.ray_job.run_on_ray`` with
``launch.cluster=ray``): the same checks, run directory, daemons and supervision. It blocks until
the job ends and returns the summary the CLI prints as its last line (``ok``, ``end``, rewards,
``run_dir``, ...). A bad configuration raises ``ConfigError`` naming the key, before anything
starts; a job that failed returns its summary with ``ok`` false. Call it from the main thread (the
supervisor takes SIGINT and SIGTERM while the job runs; the caller's handlers come back after).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

from areal_like.settings.config import RunConfig, load_config

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def config(*overrides: str) -> RunConfig:
    """The config ``areal-like run OVERRIDES`` composes and validates (``ConfigError`` naming the
    key). Change it with ``dataclasses.replace``, which validates again."""
    return load_config(list(overrides))


def run(*overrides: str | RunConfig, quiet: bool = True, accept_changes: bool = False) -> dict:
    """Run the job of ``overrides`` (Hydra's ``key=value`` strings) or of one ``RunConfig``; return
    its summary. ``quiet`` (default): the progress and the summary, the daemons' logs only in
    ``run_dir/logs`` (``False``: echoed, as ``areal-like run`` without ``-q``). ``accept_changes``:
    resume a run_dir whose settings differ (``--accept-changes``)."""
    if len(overrides) == 1 and isinstance(overrides[0], RunConfig):
        cfg = overrides[0]
    elif all(isinstance(o, str) for o in overrides):
        cfg = config(*overrides)
    else:
        raise TypeError("run() takes Hydra override strings or one RunConfig (from config())")
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        if cfg.launch.cluster == "ray":  # the same job placed on a Ray cluster (launch/RAY.md)
            from launch.ray_job import run_on_ray

            run_on_ray(cfg, quiet=quiet, accept_changes=accept_changes)
        else:
            from launch.job import run_job

            run_job(cfg, quiet=quiet, accept_changes=accept_changes)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    # written by the summary of the job that just ended (launch/records.py summarize)
    return json.loads((Path(cfg.run_dir).resolve() / "summary.json").read_text())
