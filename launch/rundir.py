"""What a run directory already holds, read before ``areal-like run`` starts anything in it.

Running the same command twice with the same ``run_dir`` continues that run. ``lock_run_dir``
refuses a directory a job still runs in (an ``flock`` that every daemon inherits, so the kernel
releases it only when the last of them is gone); ``check_existing_run`` returns the step to resume
from (0: fresh; ``trainer.steps``: trained, but its final evaluation is missing, so the rerun makes
it) and refuses a finished run or a checkpoint with ``trainer.resume=false``;
``check_resume_settings`` refuses a resume whose settings differ from ``settings.yaml`` (the config
as given) unless ``--accept-changes``, apart from ``FREE_ON_RESUME``; ``FIXED_ON_RESUME`` (the
adapters' layout) never. Accepted changes reach ``settings.yaml`` only with the first step trained
(launch/job.py, ``Monitor``); a start that is refused (by the launcher after ``write_settings``, or
by a daemon that exits 2 at start) leaves it (``restore_file``), and
``config.yaml`` as they were (launch/job.py, ``check_checkpoint_model``, refuses a change of the
model's shapes before either is touched). Only names and files are read (the ``v%08d`` layout of
trainer/checkpoint.py): no torch import, so a refusal is instant.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from areal_like.daemon import LockHeld, pid_lock
from areal_like.settings.config import ConfigError, RunConfig
from launch.local import read_json, write_atomic, write_json_atomic
from launch.records import has_final_eval
from launch.topology import wants_eval
from launch.tracking import flatten

LOCK_FILE = "job.lock"  # in run_dir; "<pid> <create_time>" of the areal-like run that took it
SETTINGS_FILE = "settings.yaml"  # in run_dir: the config as given to the last run that trained
# in run_dir: the job as `status` and `top` show it (launch/top.py), kept by `areal-like run`:
# {"state": "starting" | "running" | "ended", "started" (epoch s), "supervisor_pid",
#  "supervisor_born" (its create_time), "daemons" (as ports.json's), "summary" (once ended)}
JOB_FILE = "job.json"
# keys (prefixes) a resume may change; run_dir is the directory settings.yaml was found in, whatever
# its spelling (relative from another cwd, a symlink). Checkpoint and export retention and cadence
# train nothing (the trainer keeps the steps a crash could lose under the checkpoint's cadence:
# trainer/loop.py, ``monotonic_version``), nor do the ports /metrics listens on
FREE_ON_RESUME = ("trainer.steps", "launch.", "tracker", "tracking.", "run_dir",
                  "trainer.keep_checkpoints", "trainer.checkpoint_every",
                  "trainer.checkpoint_async", "export.keep", "export.every", "export.at_end",
                  "export.shard_mb", "buffer.metrics_port", "rollout.metrics_port",
                  "trainer.metrics_port")
# keys (prefixes) no resume may change, --accept-changes or not: they name and size the adapters the
# checkpoint holds, so the trainer could not load it (it failed on every restart)
FIXED_ON_RESUME = ("trainer.lora.rank", "trainer.lora.target_modules")

CHECKPOINT_PREFIX = "v"  # trainer/checkpoint.py PREFIX: v00000012 holds policy_version 12
CHECKPOINT_DONE = "meta.pt"  # written last into a checkpoint directory before its atomic rename


def latest_checkpoint_step(checkpoint_dir: Path) -> int | None:
    """The policy version of the newest complete checkpoint under ``checkpoint_dir``, or None."""
    versions = (p.parent.name[len(CHECKPOINT_PREFIX):]
                for p in checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*/{CHECKPOINT_DONE}"))
    return max((int(v) for v in versions if v.isdigit()), default=None)


def lock_run_dir(run_dir: Path) -> int:
    """Take ``run_dir``'s job lock (creating the directory); returns its file descriptor, to keep
    open for the job's life and hand to every daemon (``Supervisor(inherit_fds=...)``). Raises
    ConfigError naming the holder when another job has it."""
    run_dir = Path(run_dir).resolve()
    try:
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = pid_lock(run_dir / LOCK_FILE, 0o600, flags=0)  # inheritable: every daemon holds it
    except LockHeld as held:
        raise ConfigError(f"run_dir {run_dir} is in use by a running job "
                          f"(areal-like run pid {held.holder}, or its daemons still stopping): "
                          f"wait for it, stop it (areal-like stop {run_dir}), or use a new "
                          "run_dir") from None
    except OSError as e:  # a file where the directory goes, no permission, a read-only disk
        raise ConfigError(f"run_dir {run_dir} cannot be used: {e.strerror}: {e.filename}") from None
    try:
        make_private(run_dir)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_private(run_dir: Path) -> None:
    """``run_dir`` readable by this user only (0700), whatever the umask made it: the WAL, the
    checkpoints, the exports, the logs and the samples inside are reachable by no one else
    (areal_like/SECURITY.md). ConfigError when another user owns it."""
    st = os.stat(run_dir)
    if st.st_uid != os.getuid():
        raise ConfigError(f"run_dir {run_dir} belongs to uid {st.st_uid}, not this user "
                          f"({os.getuid()}): a job keeps its run directory private; use one "
                          "of your own")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(run_dir, 0o700)


def check_existing_run(cfg: RunConfig) -> int:
    """The step this invocation starts from (0 = fresh); raises ConfigError when it must not start.
    Whether a job still runs in ``run_dir`` is ``lock_run_dir``'s question, asked first."""
    run_dir = Path(cfg.run_dir).resolve()
    step = latest_checkpoint_step(cfg.resolve_path(cfg.trainer.checkpoint_dir))
    if step is None:
        return 0
    # stopped after its last step, before the final evaluation it schedules was written: the
    # trainer only pushes its weights and the evaluation is made
    if (step == cfg.trainer.steps and cfg.trainer.resume and wants_eval(cfg) and cfg.eval.at_end
            and not has_final_eval(run_dir, cfg.trainer.steps)):
        return step
    if step >= cfg.trainer.steps:
        raise ConfigError(f"run_dir {run_dir} already finished at step {step} "
                          f"(trainer.steps={cfg.trainer.steps}): "
                          "raise trainer.steps to continue, or use a new run_dir")
    if not cfg.trainer.resume:
        raise ConfigError(f"run_dir {run_dir} holds a checkpoint at step {step} "
                          "but trainer.resume=false: "
                          "use a new run_dir (or trainer.resume=true to continue it)")
    return step


def changed_settings(cfg: RunConfig) -> list[str]:
    """``key: old -> new`` for every setting of ``cfg`` that differs from the ``settings.yaml`` of
    its run_dir, apart from ``FREE_ON_RESUME``; empty when there is no such file (a run from an
    older version, or a fresh one) or nothing changed."""
    from omegaconf import OmegaConf

    from areal_like.settings.config import from_yaml

    path = Path(cfg.run_dir).resolve() / SETTINGS_FILE
    if not path.is_file():
        return []
    try:
        old = from_yaml(path.read_text())
    except Exception as e:  # noqa: BLE001
        # unreadable (a schema since changed): say so, do not guess
        return [f"{SETTINGS_FILE}: cannot be compared "
                f"({type(e).__name__}: {str(e).splitlines()[0]})"]
    before, after = (flatten(OmegaConf.to_container(OmegaConf.structured(c)), sep=".")
                     for c in (old, cfg))
    return [f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
            for key in sorted(before.keys() | after.keys())
            if before.get(key) != after.get(key) and not key.startswith(FREE_ON_RESUME)]


def check_resume_settings(cfg: RunConfig, accept: bool) -> list[str]:
    """The settings a resume of ``cfg`` changes (``changed_settings``); ConfigError listing them,
    one line each, unless ``accept`` (``areal-like run --accept-changes``). Also for a run_dir run
    before without a checkpoint yet: its WAL's groups and version labels go on."""
    changes = changed_settings(cfg)
    fixed = [c for c in changes if c.startswith(FIXED_ON_RESUME)]
    if fixed and latest_checkpoint_step(cfg.resolve_path(cfg.trainer.checkpoint_dir)) is not None:
        raise ConfigError("\n".join([f"run_dir {Path(cfg.run_dir).resolve()} holds a checkpoint "
                                      "whose LoRA adapters these settings would change:",
                                      *(f"  {c}" for c in fixed),
                                      "no resume can load it: keep them, or use a new run_dir"]))
    if changes and not accept:
        raise ConfigError("\n".join([f"run_dir {Path(cfg.run_dir).resolve()} was run with other "
                                      f"settings; resuming would change {len(changes)}:",
                                      *(f"  {c}" for c in changes),
                                      "add --accept-changes to resume with them, "
                                      "or use a new run_dir"]))
    return changes


def write_job(run_dir: Path, **fields) -> None:
    """``JOB_FILE`` updated with ``fields``, replaced atomically (a reader sees the old file or the
    new one); ``state="starting"`` begins a new one."""
    old = {} if fields.get("state") == "starting" else read_job(run_dir)
    write_json_atomic(Path(run_dir) / JOB_FILE, {**old, **fields})


def read_job(run_dir: Path) -> dict:
    """``JOB_FILE``, or {} where there is none."""
    return read_json(Path(run_dir) / JOB_FILE)


def file_state(path: Path) -> bytes | None:
    """A file's bytes, for ``restore_file``; None when there is none."""
    try:
        return path.read_bytes()
    except OSError:
        return None


def restore_file(path: Path, data: bytes | None) -> None:
    """``path`` as ``file_state`` found it (``data``; None: there was none): a start that was
    refused leaves settings.yaml, config.yaml and job.json as they were. Nothing when the disk
    refuses."""
    with contextlib.suppress(OSError):
        if data is None:
            path.unlink(missing_ok=True)
        else:
            write_atomic(path, data)


def write_settings(cfg: RunConfig) -> None:
    """``cfg`` (as given, before the layout) into ``settings.yaml``: what the next resume
    compares."""
    from areal_like.settings.config import to_yaml

    write_atomic(Path(cfg.run_dir).resolve() / SETTINGS_FILE, to_yaml(cfg))
