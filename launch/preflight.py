"""Preflight: everything a job reads from outside its config, checked before anything starts.

A missing model directory, dataset file or reward function would otherwise pass the config
validators and fail 10-30 s later inside three daemons at once, with tracebacks and restarts.
``preflight(cfg)`` runs in ``areal-like run`` (before the warm start and before any daemon) and in
``areal-like config``, on a config whose hub ids are already resolved (``areal_like.hf.resolve_models``),
and raises ``PreflightError``: one line per problem, each naming its key. It checks:

* ``model.path``: a directory with config.json and weights; ``model.tokenizer`` (when it is not a
  built-in tokenizer): a directory with a tokenizer; ``trainer.ref_path``: like model.path;
* ``warm_start.steps > 0`` only with a model built from config or one a warm start wrote;
* ``task.dataset_path`` (``task.name=dataset``) and ``task.eval_path``: exist;
* ``task.reward_fn``: loads as in a reward worker (same loader, ``task.reward_memory_mb`` address
  space, environment without secrets), in a child Python (see ``check_reward_fn``);
* the trackers' packages, through ``areal_like.tracking.check_trackers(cfg)`` when that module
  exists in this installation;
* the engine: ``rollout.engine.kind=sglang`` needs the sglang package and ``model.path``.

Paths are checked as the daemons will open them: relative to the working directory, which the
daemons inherit from the launcher.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from areal_like.callables import split_function_path
from areal_like.config import ConfigError, RunConfig
from areal_like.hf import TOKENIZER_NAMES, resolve_models
from rollout_server.reward_worker import scrubbed_env

REWARD_IMPORT_TIMEOUT_S = 120.0  # a reward module importing a big library on a loaded machine
WEIGHT_GLOBS = ("*.safetensors", "*.bin")  # what from_pretrained loads (single or sharded)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
WARM_START_MARK = "warm_start.json"  # written by launch/warmstart.py into the model directory it saves

# Run as `python -c`: the working directory is first on sys.path, as for the rollout server's
# `python -m rollout_server`. The reward worker's own loader (address-space limit, then import):
# it prints the reason and exits 1 when the reward cannot be loaded.
REWARD_PROBE = ("import sys; from rollout_server.reward_worker import probe; "
                "sys.exit(probe(sys.argv[1], int(sys.argv[2])))")


class PreflightError(ConfigError):
    """One or more inputs of the job are unusable; ``problems`` holds one line for each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def checked(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its hub ids resolved to local directories (downloaded if need be), once the
    preflight passed on it; raises PreflightError. What ``areal-like run`` and ``config`` use."""
    try:
        cfg = resolve_models(cfg)
        problems = check_models(cfg)
    except ConfigError as e:  # a model key that resolves to nothing: the other inputs are still checked
        problems = [str(e)]
    problems += [p for check in OTHER_CHECKS for p in check(cfg)]
    if problems:
        raise PreflightError(problems)
    return cfg


def preflight(cfg: RunConfig) -> None:
    """Raise PreflightError listing every problem (one line each, naming the key); None when all is well."""
    problems = [p for check in (check_models, *OTHER_CHECKS) for p in check(cfg)]
    if problems:
        raise PreflightError(problems)


def _model_dir(key: str, path: str) -> list[str]:
    p = Path(path).expanduser()
    if not p.is_dir():
        return [f"{key}={path!r} does not exist (a Hugging Face model directory, or a hub id org/name)"]
    if not (p / "config.json").is_file():
        return [f"{key}={path!r} has no config.json: not a Hugging Face model directory"]
    if not any(next(p.glob(g), None) for g in WEIGHT_GLOBS):
        return [f"{key}={path!r} has config.json but no weights ({' or '.join(WEIGHT_GLOBS)})"]
    return []


def check_models(cfg: RunConfig) -> list[str]:
    out = _model_dir("model.path", cfg.model.path) if cfg.model.path else []
    tok = cfg.model.tokenizer
    if tok not in TOKENIZER_NAMES:
        p = Path(tok).expanduser()
        if not p.is_dir():
            out.append(f"model.tokenizer={tok!r} is neither {' nor '.join(TOKENIZER_NAMES)} nor an existing directory")
        elif not any((p / f).is_file() for f in TOKENIZER_FILES):
            out.append(f"model.tokenizer={tok!r} has no {' or '.join(TOKENIZER_FILES)}: not a tokenizer directory")
    if cfg.trainer.ref_path:
        out += _model_dir("trainer.ref_path", cfg.trainer.ref_path)
    return out


def check_warm_start(cfg: RunConfig) -> list[str]:
    """The warm start trains the tiny model built from config (char tokenizer, its eos id) or refines
    a model it wrote earlier (warm_start.json); on someone's Hugging Face model it would run a
    supervised phase nobody asked for, with the tiny model's assumptions. ``model.path=X`` alone
    keeps the default model=tiny and its recipe, hence the hint."""
    path, steps = cfg.model.path, cfg.warm_start.steps
    if steps <= 0 or not path or (Path(path).expanduser() / WARM_START_MARK).is_file():
        return []
    return [f"warm_start.steps={steps} with model.path={path!r}: the warm start is for the tiny model built from "
            "config, not a Hugging Face model; add model=local_hf (no warm start, no tiny-model recipe) "
            "or warm_start.steps=0"]


def check_task_files(cfg: RunConfig) -> list[str]:
    t, out = cfg.task, []
    if t.name == "dataset" and t.dataset_path and not Path(t.dataset_path).expanduser().exists():
        out.append(f"task.dataset_path={t.dataset_path!r} does not exist (relative paths start at {os.getcwd()})")
    if t.eval_path and not Path(t.eval_path).expanduser().exists():
        out.append(f"task.eval_path={t.eval_path!r} does not exist (relative paths start at {os.getcwd()})")
    return out


def check_reward_fn(cfg: RunConfig) -> list[str]:
    """Load ``task.reward_fn`` in a child Python as a reward worker would (``REWARD_PROBE``), not here:
    it then sees the sys.path the rollout servers will see (the ``areal-like`` console script does
    not put the working directory on sys.path, ``python -m`` and ``python -c`` do), the workers'
    address-space limit and scrubbed environment, and a module that does something at import time
    (initialise CUDA, start threads, exit, hang) cannot harm the launcher."""
    spec, memory_mb = cfg.task.reward_fn, cfg.task.reward_memory_mb
    if not spec or cfg.task.reward_url:  # a remote reward replaces the function
        return []
    try:
        split_function_path(spec)
    except ValueError:
        return [f"task.reward_fn={spec!r} is not of the form package.module:function"]
    try:
        r = subprocess.run([sys.executable, "-c", REWARD_PROBE, spec, str(memory_mb)], capture_output=True,
                           text=True, timeout=REWARD_IMPORT_TIMEOUT_S, stdin=subprocess.DEVNULL, env=scrubbed_env())
    except subprocess.TimeoutExpired:
        return [f"task.reward_fn={spec!r}: importing it took over {REWARD_IMPORT_TIMEOUT_S:.0f}s"]
    if r.returncode == 0:
        return []
    lines = r.stdout.strip().splitlines()
    reason = lines[-1] if lines else f"importing it ended the interpreter with status {r.returncode}"
    return [f"task.reward_fn={spec!r} cannot be loaded in a reward worker: {reason}"]


def check_trackers(cfg: RunConfig) -> list[str]:
    """The trackers' packages installed (``areal_like.tracking.check_trackers``)."""
    from areal_like.tracking import check_trackers as check

    try:
        check(cfg)
    except ConfigError as e:
        return str(e).splitlines()[:1]
    return []
    check = getattr(importlib.import_module("areal_like.tracking"), "check_trackers", None)
    if check is None:
        return []
    try:
        check(cfg)
    except ConfigError as e:
        return str(e).splitlines()[:1]
    except Exception as e:  # noqa: BLE001 - whatever it raises, the user gets one line, not a traceback
        return [f"tracker={cfg.tracker}: {type(e).__name__}: {e}".splitlines()[0]]
    return []


def check_engine(cfg: RunConfig) -> list[str]:
    out, engine = [], cfg.rollout.engine
    if engine.kind == "sglang":
        if importlib.util.find_spec("sglang") is None:
            out.append("rollout.engine.kind=sglang needs the sglang package: pip install -e '.[sglang]' "
                       "(or topology=gpu_embedded)")
        if not cfg.model.path and cfg.warm_start.steps == 0:  # the warm start writes one
            out.append("rollout.engine.kind=sglang needs model.path (SGLang serves a Hugging Face model directory)")
    return out


# every check but check_models, which checked() runs on the resolved model keys
OTHER_CHECKS = (check_warm_start, check_task_files, check_reward_fn, check_trackers, check_engine)
