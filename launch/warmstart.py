"""A job's warm start and ``areal-like sft``: supervised fine-tuning before RL (``trainer/sft.py``).

``ensure_warm_start(cfg)`` trains ``warm_start.steps`` SFT steps and returns the config with
``model.path`` at the saved Hugging Face directory, so RL starts from it. The result is cached
under ``<warm_start.cache_dir>/<key>``: ``key`` hashes the content of the model directory
(``model.path``), of the data files (``task.dataset_path``, ``warm_start.dataset_path``) and of
the environment's module (``task.env``, whose code writes its demo conversations), not their
names, with the model, LoRA and warm-start settings and the task settings the examples
depend on (``TASK_KEYS``). A cache entry is written under a temporary name and renamed, so a
crash never leaves a half-written one. ``sft(cfg, out)`` is ``areal-like sft``: the same
training into ``out`` (by default the cache entry ``areal-like run`` with the same overrides
would use). Both train in a process of their own, ``python -m trainer.sft`` (under torchrun with
``areal-like sft --nproc-per-node K``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from areal_like.settings.config import ConfigError, RunConfig

# In the cache key: bumped when what a warm start saves changes, so older caches are not reused.
# 2: the char tokenizer spells whitespace byte-level; 3: a dataset's plain prompt column is plain
# text under chat_template=auto; 4: trained by trainer/sft.py (the RL trainer's model and
# micro-batches), keyed by content
CACHE_FORMAT = 4
# the task.* keys the SFT's examples and their layout depend on (the key leaves out what only RL
# and the evaluation read: group_size, temperature, rewards, ...; the accuracy the summary
# reports is the first run's)
TASK_KEYS = ("name", "dataset_path", "eval_fraction", "prompt_key", "messages_key", "answer_key",
             "system_prompt", "chat_template", "max_prompt_tokens", "num_prompts", "digits",
             "seed", "env", "env_args", "agent", "agent_tool_format")


def content_hash(path: str | None) -> str | None:
    """SHA-256 of a file's bytes (not its name), or of a directory's files (relative names and
    bytes, in name order); None for no path (a model built from config); the value itself for a
    path that does not exist (a tokenizer name such as ``char``)."""
    if not path:
        return None
    root = Path(path).expanduser()
    if not root.exists():
        return path
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0")  # "." for a file
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def module_hash(name: str | None) -> str | None:
    """SHA-256 of the source file of the module ``name`` names (``package.module`` or
    ``package.module:Attr``); None where it names no module with a file (an installed id)."""
    try:
        spec = importlib.util.find_spec(name.split(":")[0]) if name else None
    except (ImportError, ValueError):
        return None
    return content_hash(spec.origin) if spec and spec.has_location else None


def cache_key(cfg: RunConfig) -> str:
    model = dataclasses.asdict(cfg.model) | {"path": content_hash(cfg.model.path),
                                             "tokenizer": content_hash(cfg.model.tokenizer)}
    task = {k: v for k, v in dataclasses.asdict(cfg.task).items() if k in TASK_KEYS}
    task["dataset_path"] = content_hash(task["dataset_path"])
    if env_source := module_hash(task["env"]):
        task["env_source"] = env_source
    ws = {k: v for k, v in dataclasses.asdict(cfg.warm_start).items()
          if k not in ("cache_dir", "eval_prompts")}
    ws["dataset_path"] = content_hash(ws["dataset_path"])
    blob = json.dumps({"model": model, "task": task, "ws": ws, "seed": cfg.seed,
                       "lora": dataclasses.asdict(cfg.trainer.lora), "format": CACHE_FORMAT},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_path(cfg: RunConfig) -> Path:
    base = Path(cfg.warm_start.cache_dir)
    if not base.is_absolute():
        base = Path(cfg.run_dir).resolve().parent / base
    return base / cache_key(cfg)


def model_dir(cfg: RunConfig, out: Path) -> Path:
    """The model directory SFT writes at ``out``: ``out/merged`` with LoRA (the adapter is in
    ``out``)."""
    from trainer.export import MERGED_DIR

    return out / MERGED_DIR if cfg.trainer.lora.enabled else out


def ensure_warm_start(cfg: RunConfig, log: Callable[[str], None] = print) -> RunConfig:
    """``cfg`` with ``model.path`` set to the warm-started model (trained now or from the cache)."""
    if cfg.warm_start.steps <= 0:
        return cfg
    if cfg.model.path:
        log(f"model.path={cfg.model.path} is set; the warm start fine-tunes that model")
    out = cache_path(cfg)
    if (model_dir(cfg, out) / "config.json").is_file():
        log(f"cached: {out}")
    else:
        t0 = time.monotonic()
        publish_sft(cfg, out, log, replace=False)
        log(f"saved {out} in {time.monotonic() - t0:.0f}s")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                              path=str(model_dir(cfg, out))))


def publish_sft(cfg: RunConfig, out: Path, log: Callable[[str], None],
                replace: bool) -> dict:
    """Train into a temporary sibling of ``out`` (``python -m trainer.sft``: a process of its
    own, so no process group, device memory or thread setting stays with the caller), then rename
    it to ``out``; when another process finished ``out`` first (and not ``replace``), theirs is
    kept. The summary."""
    from areal_like.settings.config import to_yaml

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        with tempfile.TemporaryDirectory() as d:
            config = Path(d) / "config.yaml"
            config.write_text(to_yaml(cfg))
            summary = run_sft(["--config-file", str(config), "--out", str(tmp)], log)
        try:
            os.replace(tmp, out)
        except OSError:  # another run finished the same key first: use theirs
            if replace:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary | {"out": str(out), "model": str(model_dir(cfg, out))}


def run_sft(args: list[str], log: Callable[[str], None]) -> dict:
    """``python -m trainer.sft ARGS``, its log lines passed to ``log``; its summary. Its refusal
    (exit 2) is a ConfigError of its ``error:`` lines."""
    proc = subprocess.Popen([sys.executable, "-m", "trainer.sft", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={"OMP_NUM_THREADS": "1", **os.environ})
    errors = []
    try:
        for line in proc.stderr:
            line = line.rstrip("\n")
            if line.startswith("error: "):
                errors.append(line.removeprefix("error: "))
            else:
                log(line.removeprefix("[sft] "))
        out = proc.stdout.read()
        code = proc.wait()
    except BaseException:  # Ctrl-C, a stop signal: the training stops with the caller
        proc.kill()
        proc.wait()
        raise
    if code != 0:
        raise ConfigError("\n".join(errors) or f"supervised fine-tuning (python -m trainer.sft) "
                          f"exited with {code}; its log above says why")
    return json.loads(out.strip().splitlines()[-1])


def sft_target(cfg: RunConfig, out: str | None) -> Path:
    """Where ``areal-like sft`` writes: ``out``, or the warm-start cache entry of ``cfg`` (which
    ``areal-like run`` with the same overrides then reuses); refused when it exists."""
    if cfg.warm_start.steps <= 0:
        raise ConfigError("warm_start.steps=0: set warm_start.steps=N, the number of SFT "
                          "optimizer steps")
    target = Path(out).expanduser().resolve() if out else cache_path(cfg)
    if target.exists():
        raise ConfigError(f"{target} exists: give --out a new directory"
                          + ("" if out else " (or use that model: it is the cached result)"))
    return target


def sft(cfg: RunConfig, out: str | None, log: Callable[[str], None] = print) -> dict:
    """``areal-like sft`` on one rank: train into ``sft_target``; the summary."""
    return publish_sft(cfg, sft_target(cfg, out), log, replace=True)


def evaluate(model, tok, task, indices: list[int], max_new_tokens: int,
             temperature: float) -> tuple[float, float]:
    """(greedy accuracy, sampled accuracy at ``temperature``) over the given prompts
    (``trainer.sft.evaluate`` with the task's reward)."""
    from trainer.sft import evaluate as sft_evaluate

    return sft_evaluate(model, tok, task, indices, max_new_tokens, temperature)
