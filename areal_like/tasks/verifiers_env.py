"""verifiers environments (``task=verifiers``): ``task.env`` names a verifiers 0.4 taskset (an
installed package's id or a module path) and ``task.env_args`` sets its config's fields.

The taskset's tasks are the prompts (``examples``; ``task.py``'s ``VerifiersTask``). Each episode
is verifiers' own single-agent episode (``Env.run_slot``) run by ``run`` in a sandboxed agent
worker, under the one ``Env.serving()`` the worker holds (``Served``: its interception server and
the taskset's shared tool servers start once per worker): verifiers' interception server relays
its model calls to the rollout server's agent endpoint, which records every token, and the sum of
the task's weighted rewards (its ``@vf.reward`` methods) is the episode's reward. The chat loop is
verifiers' own program, run in the worker's process (``vf_harness.py``); tool servers
(``vf.Toolset``) run as subprocesses of the worker.

Nothing here imports verifiers at module level: without the ``verifiers`` extra the launcher's
preflight names it (``missing``).
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib
import importlib.util
import json
import os
import random
import sys
import tempfile
import threading
import traceback
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


def load_error(e: Exception) -> str:
    """What went wrong loading an environment, in the job's words: a taskset config field as
    ``task.env_args.<field>``; else the error and the line of code that raised it."""
    from pydantic import ValidationError  # verifiers' configs are pydantic models

    if isinstance(e, ValidationError):
        fields = [(".".join(map(str, err["loc"][1:])), err["msg"]) for err in e.errors()
                  if err["loc"][:1] == ("taskset",)]
        return "; ".join(f"task.env_args.{key}: {msg}" for key, msg in fields) or str(e)
    frame = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
    where = f" ({frame[0].filename}:{frame[0].lineno})" if frame else ""
    return f"{type(e).__name__}: {e}{where}"


def chat_messages(system: str | None, prompt: Any) -> list[dict]:
    """A task's system prompt and prompt (text or verifiers messages) as chat messages."""
    from verifiers.v1.dialects.chat import message_to_wire

    out = [{"role": "system", "content": system}] if system else []
    if isinstance(prompt, str):
        return out + [{"role": "user", "content": prompt}]
    return out + [message_to_wire(m) for m in prompt or []]


def examples(cfg: TaskConfig) -> list[Example]:
    """The taskset's first ``task.num_prompts`` tasks in its order (so a ``load()`` that never
    ends, ``INFINITE`` or not, stops there); each example carries the task's data, so an agent
    worker rebuilds the task without the dataset."""
    if why := missing():
        raise ConfigError(why)
    try:
        taskset = load(cfg.env, json.dumps(cfg.env_args, sort_keys=True)).taskset
    except Exception as e:  # an import, a config field or the taskset's own check
        raise ConfigError(f"task.env={cfg.env!r} with task.env_args={cfg.env_args!r} cannot be "
                          f"loaded: {load_error(e)}") from e
    tasks = taskset.take(cfg.num_prompts)
    meta = {"env": cfg.env, "env_args": cfg.env_args}
    out = [Example(t.data.prompt_text, str(getattr(t.data, "answer", "") or ""),
                   chat_messages(t.data.system_prompt, t.data.prompt),
                   {"verifiers": {**meta, "task": t.data.model_dump(mode="json")}}) for t in tasks]
    if not out:
        raise ConfigError(f"task.env={cfg.env!r}: the taskset has no tasks")
    return out


class Served:
    """verifiers' serving resources (``Env.serving``: its interception server, the taskset's
    shared tool servers) held for a worker process's whole life, as an eval holds them for all
    its episodes: a shared tool server starts once, not once an episode (its process's imports
    alone cost seconds). They live on an event loop of their own in a daemon thread, each env's
    in one task that holds ``serving()`` open (what it enters, anyio's task groups, must be left
    by the task that entered it); episodes run as tasks on that loop."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="verifiers-serving",
                         daemon=True).start()
        # key -> (the env, the event that ends its serving, the task holding it)
        self.envs: dict[str, tuple[Any, asyncio.Event, asyncio.Task]] = {}
        atexit.register(self.close)

    async def env(self, key: str) -> Any:
        """The loaded env of ``key`` (its id and JSON args), serving (on this loop)."""
        if key in self.envs:
            return self.envs[key][0]
        env, stop, ready = load(*json.loads(key)), asyncio.Event(), self.loop.create_future()

        async def hold():
            try:
                async with env.serving():
                    ready.set_result(None)
                    await stop.wait()
            except BaseException as e:
                if not ready.done():
                    ready.set_exception(e)
                raise

        task = self.loop.create_task(hold())
        self.envs[key] = env, stop, task
        try:
            await ready
        except BaseException:
            self.envs.pop(key, None)
            task.cancel()
            raise
        return env

    async def drop(self, key: str) -> None:
        """Leave ``key``'s ``serving()``, waiting for it (a next one reuses the env object)."""
        if (held := self.envs.pop(key, None)) is not None:
            held[1].set()
            with contextlib.suppress(BaseException):
                await held[2]

    def close(self) -> None:
        """Leave every ``serving()`` (its tool servers stop) at the process's exit."""
        async def leave():
            await asyncio.gather(*(self.drop(k) for k in list(self.envs)))

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(leave(), self.loop).result(10)


@lru_cache(maxsize=1)
def served() -> Served:
    return Served()


async def run(client_base_url: str, api_key: str, example: Example) -> float:
    """One verifiers episode of ``example``'s task against the agent endpoint; its reward."""
    if not os.access(Path.home(), os.W_OK):  # a sandboxed worker: only its own /tmp is writable,
        os.environ["HOME"] = tempfile.gettempdir()  # and verifiers keeps runtimes under ~/.cache
    hold = served()
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
        episode(hold, client_base_url, api_key, example), hold.loop))


async def episode(hold: Served, client_base_url: str, api_key: str, example: Example) -> float:
    """``run``'s episode, on ``hold``'s loop."""
    import verifiers.v1 as vf
    from verifiers.v1.env import RunSlot

    meta = example.metadata["verifiers"]
    key = json.dumps([meta["env"], json.dumps(meta["env_args"], sort_keys=True)])
    env = await hold.env(key)
    task_cls = type(env.taskset).task_type()
    task = task_cls(task_cls.data_type().model_validate(meta["task"]), env.taskset.config.task)
    os.environ[KEY_VAR] = api_key  # one episode at a time per worker
    # verifiers' interception server keeps one model client per distinct client config, its key
    # read when it is made: a config of the episode's own (a header naming it) gets a client
    # with this episode's key, closed and forgotten when the episode ends
    client = vf.EvalClientConfig(base_url=client_base_url, api_key_var=KEY_VAR,
                                 headers={"X-Areal-Episode": api_key[-12:]})
    try:
        episode = await env.run_slot(RunSlot(task), vf.ModelContext(model=MODEL, client=client))
    except BaseException:
        await hold.drop(key)  # verifiers itself failed: the next episode serves afresh
        raise
    finally:
        await forget_client(env, client.model_dump_json())
    errors = episode.errors + [e for t in episode.traces for e in t.errors]
    if errors:  # the next episode serves afresh: a failed episode can leave the interception
        await hold.drop(key)  # server's client unusable (later calls all failing)
        raise RuntimeError(f"verifiers episode failed: {errors[0].type}: {errors[0].message}")
    return sum(t.reward for t in episode.traces)


async def forget_client(env: Any, key: str) -> None:
    """Close and forget the model client the interception servers made for the client config
    ``key`` (an elastic pool's ``servers``, or one server)."""
    interception = env._interception
    for server in getattr(interception, "servers", [interception]):
        clients = getattr(server, "clients", None)
        if clients is not None and (made := clients.pop(key, None)) is not None:
            await made.close()


def demo(example: Example, rng: random.Random) -> list[dict]:
    """The warm start's conversation: the taskset's own ``demo(messages, task, rng)`` (a method:
    the prompt's messages and the task's data as JSON, to the whole conversation, tool calls and
    tool replies included) when it has one, else the prompt and the task's ``answer``
    field."""
    meta = example.metadata["verifiers"]
    taskset = load(meta["env"], json.dumps(meta["env_args"], sort_keys=True)).taskset
    if callable(own := getattr(taskset, "demo", None)):
        return own(list(example.messages), meta["task"], rng)
    if not example.answer:
        raise ConfigError("warm_start.steps > 0 with task=verifiers needs tasks with an `answer` "
                          "field or a taskset demo(messages, task, rng) to learn from; set "
                          "warm_start.steps=0")
    return [*example.messages, {"role": "assistant", "content": example.answer}]


run.demo = demo
