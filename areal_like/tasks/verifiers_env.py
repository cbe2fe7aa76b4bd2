"""verifiers environments (``task=verifiers``): ``task.env`` names a verifiers 0.4 taskset (an
installed package's id or a module path) and ``task.env_args`` sets its config's fields.

The taskset's tasks are the prompts (``examples``; ``task.py``'s ``VerifiersTask``). Each episode
is verifiers' own
single-agent episode (``Env.run_slot``) run by ``run`` in a sandboxed agent worker: verifiers'
interception server relays its model calls to the rollout server's agent endpoint, which records
every token, and the sum of the task's weighted rewards (its ``@vf.reward`` methods) is the
episode's reward. The chat loop is verifiers' own program, run in the worker's process
(``vf_harness.py``); tool servers (``vf.Toolset``) run as subprocesses of the worker.

Nothing here imports verifiers at module level: without the ``verifiers`` extra the launcher's
preflight names it (``missing``).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import random
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from areal_like.settings.config import ConfigError, TaskConfig
from areal_like.tasks.datasets import Example

INSTALL = "pip install 'areal-like[verifiers]'"
HARNESS = "areal_like.tasks.vf_harness"
KEY_VAR = "AREAL_LIKE_VERIFIERS_KEY"  # the episode's endpoint key, read by verifiers' client
MODEL = "policy"  # the endpoint serves one model whatever the name


def missing() -> str:
    """Why ``task.name=verifiers`` cannot run here ("" when it can)."""
    if importlib.util.find_spec("verifiers") is None:
        return f"task.name=verifiers needs the verifiers package: {INSTALL}"
    return ""


def plugin_id(env_id: str) -> str:
    """The id verifiers imports for a plugin (a taskset, a harness): an installed package's as
    given; a module path's last part, under which the module is registered (verifiers imports a
    taskset by a top-level name only)."""
    if "/" in env_id or "@" in env_id or "." not in env_id:
        return env_id
    module, alias = importlib.import_module(env_id), env_id.rsplit(".", 1)[1]
    if sys.modules.setdefault(alias, module) is not module:
        raise ImportError(f"a module named {alias!r} is already imported: rename {env_id}")
    return alias


@lru_cache(maxsize=4)
def load(env_id: str, env_args: str) -> Any:
    """verifiers' ``load_environment`` for ``env_id`` with ``env_args`` (JSON) as its taskset's
    config; the agent plays through the in-process harness on the host."""
    import verifiers.v1 as vf
    from verifiers.v1.utils.loaders import load_environment

    config = vf.SingleAgentEnvConfig(
        taskset={**json.loads(env_args), "id": plugin_id(env_id)},
        agent={"harness": {"id": plugin_id(HARNESS)}, "runtime": {"type": "subprocess"}})
    return load_environment(config)


def chat_messages(system: str | None, prompt: Any) -> list[dict]:
    """A task's system prompt and prompt (text or verifiers messages) as chat messages."""
    from verifiers.v1.dialects.chat import message_to_wire

    out = [{"role": "system", "content": system}] if system else []
    if isinstance(prompt, str):
        return out + [{"role": "user", "content": prompt}]
    return out + [message_to_wire(m) for m in prompt or []]


def examples(cfg: TaskConfig) -> list[Example]:
    """The taskset's tasks in its order (at most ``task.num_prompts`` of an infinite one); each
    example carries the task's data, so an agent worker rebuilds the task without the dataset."""
    if why := missing():
        raise ConfigError(why)
    try:
        taskset = load(cfg.env, json.dumps(cfg.env_args, sort_keys=True)).taskset
    except Exception as e:  # an import, a config field or the taskset's own check
        raise ConfigError(f"task.env={cfg.env!r} with task.env_args={cfg.env_args!r} cannot be "
                          f"loaded: {type(e).__name__}: {e}") from e
    tasks = taskset if taskset.bounded else taskset.take(cfg.num_prompts)
    meta = {"env": cfg.env, "env_args": cfg.env_args}
    out = [Example(t.data.prompt_text, str(getattr(t.data, "answer", "") or ""),
                   chat_messages(t.data.system_prompt, t.data.prompt),
                   {"verifiers": {**meta, "task": t.data.model_dump(mode="json")}}) for t in tasks]
    if not out:
        raise ConfigError(f"task.env={cfg.env!r}: the taskset has no tasks")
    return out


async def run(client_base_url: str, api_key: str, example: Example) -> float:
    """One verifiers episode of ``example``'s task against the agent endpoint; its reward."""
    if not os.access(Path.home(), os.W_OK):  # a sandboxed worker: only its own /tmp is writable,
        os.environ["HOME"] = tempfile.gettempdir()  # and verifiers keeps runtimes under ~/.cache
    import verifiers.v1 as vf
    from verifiers.v1.env import RunSlot

    meta = example.metadata["verifiers"]
    env = load(meta["env"], json.dumps(meta["env_args"], sort_keys=True))
    task_cls = type(env.taskset).task_type()
    task = task_cls(task_cls.data_type().model_validate(meta["task"]), env.taskset.config.task)
    os.environ[KEY_VAR] = api_key  # one episode at a time per worker
    client = vf.EvalClientConfig(base_url=client_base_url, api_key_var=KEY_VAR)
    async with env.serving():
        episode = await env.run_slot(RunSlot(task), vf.ModelContext(model=MODEL, client=client))
    errors = episode.errors + [e for t in episode.traces for e in t.errors]
    if errors:
        raise RuntimeError(f"verifiers episode failed: {errors[0].type}: {errors[0].message}")
    return sum(t.reward for t in episode.traces)


def demo(example: Example, rng: random.Random) -> list[dict]:
    """The warm start's conversation: the prompt and the task's ``answer`` field."""
    if not example.answer:
        raise ConfigError("warm_start.steps > 0 with task=verifiers needs tasks with an `answer` "
                          "field to learn from; set warm_start.steps=0")
    return [*example.messages, {"role": "assistant", "content": example.answer}]


run.demo = demo
