"""Evaluation on the task's eval split, through an engine serving one known policy version.

Two callers share ``evaluate``: the rollout server started with ``rollout.eval=true``
(``EvalSchedule`` says when; the choreography with the buffer and the trainer is in
rollout_server/ROLLOUT.md, "Evaluation"), and ``areal-like eval MODEL`` (``main``): an HF
directory or a trainer checkpoint, evaluated on its own with an embedded engine (a LoRA run's
export, an adapter in PEFT's layout: its ``merged/`` when it has one, else folded into the base
it names first). Its task is never guessed (``_eval_config``): ``--config-file``; else
``task=NAME`` on the command line; else
the config.yaml of the run the model sits in (``run_dir/export/vN``, its ``merged/``,
``run_dir/checkpoints/vN``), or the one an export names (``run_config``: ``areal-like export``
writes it) where that file is the evaluating user's own; else the task an export stores
(``areal_like_task.yaml``), with its run's ``eval.*`` and ``seed`` under the overrides given; else
the ``task.*`` overrides given, for a model of the user's (``model=local_hf``: the task's sampling
settings, never ``model=tiny``'s recipe); else it refuses (exit 2). The sampling settings are
printed and recorded (``sampling``); ``--samples FILE`` writes every prompt's responses and
rewards. The record's ``policy_version`` is the
one an export stores, else its directory's name's (``v00000200``). An export's task file is data
(``export_data``: no interpolation), its ``reward_fn`` one of ``PROJECT_REWARDS`` and its
``reward_url`` none unless the command line names them, and eval refuses to start inside the
model's directory (areal_like/SECURITY.md, "Evaluating an export").

One evaluation (a line of ``<run_dir>/eval.jsonl``) over ``n`` prompts: ``greedy_accuracy``
(share of greedy responses at full credit, reward >= 1) and ``greedy_reward`` (their mean);
``mean@k`` (mean reward of ``k`` samples at the sampling temperature) and ``pass@k`` (share of
prompts with one of them at full credit). Every token must come from ``policy_version``; the
record carries the versions seen (``token_versions``), so a violation is visible. Each sampled
response has its own ``sampling_seed``, from the config's ``seed``, the prompt and the sample: on
the embedded engine an evaluation is repeatable (SGLang uses the seed only when launched with
``--enable-deterministic-inference``: ROLLOUT.md, Evaluation).
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from areal_like.engines.client import EngineClient, EngineError
from areal_like.engines.sglang import SGLangClient
from areal_like.net.answers import peer_text
from areal_like.net.metrics import Metrics
from areal_like.settings.config import EvalConfig, LoraConfig, RunConfig, TaskConfig
from rollout_server.episode import gather_or_cancel, generate_sample, output_room
from rollout_server.facts import RolloutFacts

# a response "is correct" when its reward reaches 1 (verifiable rewards are 0/1)
FULL_CREDIT = 1.0 - 1e-6
EVAL_FILE = "eval.jsonl"
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's: a LoRA run exports its adapter
MERGED_DIR = "merged"  # a LoRA export's merged model (export.merged=true), beside the adapter
# the rewards an export's task file may name (_refuse_untrusted): the project's own
PROJECT_REWARDS = frozenset({"areal_like.tasks.task:exact_match",
                             "areal_like.tasks.task:countdown_reward",
                             "areal_like.tasks.rewards:math_reward"})


class EvalSchedule:
    """Which engine versions to evaluate (module docstring); ``done`` survives restarts via
    eval.jsonl."""

    def __init__(self, ev: EvalConfig, steps: int, done: set[int] | None = None):
        self.ev, self.steps = ev, steps
        self.done = set(done or ())

    def due(self, version: int) -> bool:
        if version in self.done:
            return False
        if version == 0:
            return self.ev.at_start and self.ev.every > 0
        if version >= self.steps:
            return self.ev.at_end and version == self.steps
        if self.ev.every <= 0:
            return False
        last = max((v for v in self.done if v < version), default=0)
        return version // self.ev.every > last // self.ev.every

    def describe(self) -> str:
        """When, in words: "at the start, every 10 versions and at version 200"."""
        ev = self.ev
        when = [w for w, on in (("at the start", ev.at_start and ev.every > 0),
                                (f"every {ev.every} versions", ev.every > 0),
                                (f"at version {self.steps}", ev.at_end)) if on]
        return " and ".join([", ".join(when[:-1]), when[-1]] if len(when) > 1 else when) or "never"

    def is_final(self, version: int) -> bool:
        return version >= self.steps


def read_done_versions(path: Path) -> set[int]:
    """Versions already evaluated in this run (a restarted server does not repeat them)."""
    done = set()
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                done.add(int(json.loads(line)["policy_version"]))
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line
    return done


def append_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def summarize(rewards_greedy: Sequence[float], rewards_sampled: Sequence[Sequence[float]],
              k: int) -> dict:
    """The eval figures from per-prompt rewards (pure; see the module docstring)."""
    n = len(rewards_greedy)
    out = {"n": n, "k": k,
           "greedy_accuracy": sum(r >= FULL_CREDIT for r in rewards_greedy) / n if n else 0.0,
           "greedy_reward": sum(rewards_greedy) / n if n else 0.0}
    if k > 0 and n:
        out[f"mean@{k}"] = sum(sum(rs) / k for rs in rewards_sampled) / n
        out[f"pass@{k}"] = sum(any(r >= FULL_CREDIT for r in rs) for rs in rewards_sampled) / n
    return out


def sampling_settings(ev: EvalConfig, task: TaskConfig) -> dict:
    """How an evaluation samples: ``eval.*`` where set, else the task's (``max_new_tokens`` is
    at most what the context leaves a prompt); greedy responses are always measured too."""
    return {"temperature": ev.temperature or task.temperature, "top_p": task.top_p,
            "top_k": task.top_k, "max_new_tokens": ev.max_new_tokens or task.max_new_tokens,
            "samples_per_prompt": ev.k}


async def evaluate(client: EngineClient, examples: Sequence, encode: Callable[[object], list[int]],
                   decode: Callable[[list[int]], str], rewards, ev: EvalConfig, task: TaskConfig,
                   stop_token_ids: list[int], version_fn: Callable[[], int], concurrency: int = 64,
                   seed: int = 0, context: int = 0, max_input: int = 0,
                   samples: list | None = None) -> dict:
    """Greedy and ``ev.k`` sampled responses for every example (``sampling_settings``), scored
    with ``rewards`` (a RewardPool); the output budget at most what ``context`` leaves (0: no
    limit; ``max_input``: episode.py ``output_room``); sample ``j`` of example ``i`` seeded from
    ``(seed, i, j)``. Returns the figures plus the lowest and highest token version seen;
    ``samples``: a list that gets each example's ``sample_row``."""
    gate = asyncio.Semaphore(concurrency)
    versions: set[int] = set()
    base = {"top_p": task.top_p, "top_k": task.top_k, "stop_token_ids": list(stop_token_ids),
            "temperature": sampling_settings(ev, task)["temperature"]}

    async def one(ids: list[int], sampling: dict, budget: int) -> list[int]:
        async with gate:
            s = await generate_sample(client, ids, sampling, budget, version_fn)
        versions.update(s.versions)
        return s.output_ids

    def sampled(i: int, j: int) -> dict:  # a seed within int64 and >= 0, whatever `seed` is
        return dict(base, sampling_seed=random.Random(f"{seed}/{i}/{j}").getrandbits(63))

    async def per_example(i: int, ex) -> tuple[float, list[float]] | None:
        """The example's greedy reward and sampled rewards; None when its prompt leaves no room
        (not sent: counted in ``no_room``, as training skips it) or the engine refused it
        (counted in ``errors``, not fatal unless every example fails)."""
        ids = encode(ex)
        budget = output_room(len(ids), task, context, ev.max_new_tokens or 0, max_input)
        if budget <= 0:
            no_room.append(i)
            return None
        try:  # a refused request stops its siblings: none may outlive the client
            outs = await gather_or_cancel([one(ids, dict(base, temperature=0.0), budget),
                                           *(one(ids, sampled(i, j), budget)
                                             for j in range(ev.k))])
        except EngineError as e:
            errors.append(e)
            return None
        scored = await rewards.score_group(ex.prompt, texts := [decode(o) for o in outs], ex)
        if samples is not None:
            samples.append(sample_row(i, ex, texts, scored))
        return scored[0][0], [r for r, _ in scored[1:]]

    errors: list[EngineError] = []
    no_room: list[int] = []  # examples whose prompt leaves no room (not sent)
    # a reward that cannot load: its siblings must not outlive the client
    results = [r for r in await gather_or_cancel(per_example(i, ex)
                                                 for i, ex in enumerate(examples))
               if r is not None]
    if errors and not results:  # its status: the first refusal's (None read 'unreachable')
        raise EngineError(errors[0].endpoint, errors[0].status,
                          f"every eval prompt failed; the first: {peer_text(errors[0].message)}")
    figures = summarize([g for g, _ in results], [s for _, s in results], ev.k)
    if errors:
        figures["errors"], figures["first_error"] = len(errors), f"EngineError: {errors[0]}"
    figures |= {"no_room": len(no_room)} if no_room else {}
    figures["token_versions"] = [min(versions), max(versions)] if versions else []
    return figures


def sample_row(index: int, example, responses: list[str], scored: list) -> dict:
    """One line of ``areal-like eval --samples``: the prompt, its reference answer, the greedy
    response and the sampled ones, each with its reward (and the reward's error, if any)."""
    def one(text: str, score) -> dict:
        reward, error = score
        return {"response": text, "reward": reward, **({"error": error} if error else {})}

    return {"index": index, "prompt": example.prompt, "answer": example.answer,
            "greedy": one(responses[0], scored[0]),
            "sampled": [one(t, sc) for t, sc in zip(responses[1:], scored[1:])]}


def record_eval_metrics(metrics, record: dict, k: int) -> None:
    """An evaluation's figures as gauges: ``rollout/eval_greedy_accuracy`` and ``_greedy_reward``,
    and ``rollout/eval_mean`` / ``rollout/eval_pass`` with the sample count as label ``k`` (one
    series name whatever ``eval.k`` is)."""
    for key in ("greedy_accuracy", "greedy_reward"):
        if key in record:
            metrics.gauge(f"rollout/eval_{key}", f"last evaluation: {key}").set(record[key])
    for key in ("mean", "pass"):
        if f"{key}@{k}" in record:
            metrics.gauge(f"rollout/eval_{key}",
                          f"last evaluation: {key}@k over k samples a prompt",
                          labels=("k",)).labels(k=str(k)).set(record[f"{key}@{k}"])


class ServerEvaluator:
    """The rollout server's side: the eval split, the schedule, and where records go."""

    def __init__(self, facts: RolloutFacts, tokenizer, rewards, metrics=None):
        from areal_like.tasks.task import encode_prompt, make_task

        self.facts, self.tokenizer, self.rewards = facts, tokenizer, rewards
        self.metrics = metrics or Metrics()  # None: counted nowhere
        task = make_task(facts.task, tokenizer=tokenizer, split="eval")
        self.reward_path = task.reward_path
        n = len(task) if not facts.eval.max_examples else min(len(task), facts.eval.max_examples)
        self.examples = [task.example(i, 0) for i in range(n)]
        self.encode = lambda ex: encode_prompt(tokenizer, ex, facts.task)
        self.path = facts.run_dir / EVAL_FILE
        self.schedule = EvalSchedule(facts.eval, facts.steps, read_done_versions(self.path))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    async def figures(self, client: EngineClient, version: int, max_input: int = 0,
                      samples: list | None = None) -> dict:
        """``evaluate`` of the eval split on ``client``'s engine, which serves ``version`` and
        refuses an input of ``max_input`` tokens (0: none)."""
        eos = self.tokenizer.eos_token_id
        return await evaluate(client, self.examples, self.encode, self.decode, self.rewards,
                              self.facts.eval, self.facts.task,
                              [int(eos)] if eos is not None else [], lambda: version,
                              seed=self.facts.seed, context=self.facts.context,
                              max_input=max_input, samples=samples)

    async def run(self, client: EngineClient, version: int, max_input: int = 0) -> dict:
        """Evaluate the engine (which serves ``version``) and record the result."""
        t0 = time.monotonic()
        figures = await self.figures(client, version, max_input)
        record = {"time": time.time(), "policy_version": version,
                  "final": self.schedule.is_final(version),
                  "seconds": round(time.monotonic() - t0, 3), **figures}
        append_record(self.path, record)
        self.schedule.done.add(version)
        record_eval_metrics(self.metrics, record, self.facts.eval.k)
        self.metrics.gauge("rollout/eval_policy_version",
                           "policy version of the last evaluation").set(version)
        self.metrics.counter("rollout/evaluations", "evaluations run").inc()
        return record


# ---------------------------------------------------------------------- `areal-like eval`
def _version_of(path: Path) -> int | None:
    """The policy version an export stores, else the directory's name's: ``.../v00000200`` (an
    export or a checkpoint directory) -> 200."""
    from areal_like.settings.config import EXPORT_TASK_FILE, export_settings

    stored = path / EXPORT_TASK_FILE
    if stored.is_file() and (version := export_settings(stored.read_text())[1]) is not None:
        return version
    name = path.resolve().name
    return int(name[1:]) if name.startswith("v") and name[1:].isdigit() else None


def _is_checkpoint(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / "meta.pt").is_file()


def _default_config(path: Path) -> Path | None:
    """The run's config.yaml for ``run_dir/export/vN`` (and its ``merged/``) or
    ``run_dir/checkpoints/vN``."""
    path = path.resolve()
    if path.name == MERGED_DIR and (path.parent / ADAPTER_CONFIG).is_file():
        path = path.parent
    candidate = path.parent.parent / "config.yaml"
    return candidate if candidate.is_file() else None


def _recorded_config(path: Path) -> Path | None:
    """The run config.yaml an export names (``run_config`` in its task file: ``areal-like
    export`` writes it), when it is yours: a file owned by this user that no one else may write,
    in a run directory (owned by this user, mode 0700, as every run directory is made), named by
    an absolute path, no link on the way's last two steps. An export made elsewhere names a file
    that is not here, or not in a run directory of yours: None. An archive can carry such modes,
    so what this config may choose is settings: its rewards are checked as the stored task's are
    (``_refuse_untrusted``)."""
    import stat

    from areal_like.settings.config import EXPORT_TASK_FILE, export_data

    stored = path / EXPORT_TASK_FILE
    named = export_data(stored.read_text()).get("run_config") if stored.is_file() else None
    if not isinstance(named, str):
        return None
    if not Path(named).is_absolute():
        return None
    try:
        st, run_dir = Path(named).lstat(), Path(named).parent.lstat()
    except OSError:
        return None
    mine = (stat.S_ISREG(st.st_mode) and stat.S_ISDIR(run_dir.st_mode)
            and st.st_uid == run_dir.st_uid == os.getuid()
            and not st.st_mode & 0o022 and stat.S_IMODE(run_dir.st_mode) == 0o700)
    return Path(named) if mine else None


def _to_hf_dir(checkpoint: Path, config_file: Path | None, out: Path) -> Path:
    """A trainer checkpoint converted by ``python -m trainer.export`` (the trainer owns that
    format)."""
    argv = [sys.executable, "-m", "trainer.export", str(checkpoint), str(out)]
    if config_file is not None:
        argv += ["--config-file", str(config_file)]
    # its JSON line is not ours: one line out
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return out


def _merged(adapter_dir: Path, out: Path) -> Path:
    """A LoRA run's export (``adapter_config.json``, naming its base directory) folded into its
    base by PEFT: a plain HF directory at ``out``, with the export's tokenizer."""
    import shutil

    import torch
    from peft import AutoPeftModelForCausalLM

    from areal_like.settings.config import ConfigError

    base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise ConfigError(f"{adapter_dir} is a LoRA adapter whose base model ({base!r}, "
                          f"base_model_name_or_path of its {ADAPTER_CONFIG}) is not a local model "
                          "directory: evaluate the run's checkpoint or an export.merged=true "
                          "export's merged/ instead")
    shutil.copytree(adapter_dir, out, ignore=shutil.ignore_patterns("adapter_*"))
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir), dtype=torch.float32)
    peft_model.merge_and_unload().save_pretrained(str(out))
    return out


async def _evaluate_model(cfg: RunConfig, version: int | None,
                          samples: list | None = None) -> dict:
    from areal_like.tasks.tokenizer import load_tokenizer
    from rollout_server.engine import EmbeddedEngine
    from rollout_server.reward_pool import RewardPool

    tokenizer = load_tokenizer(cfg.model)
    # a missing eval split fails here, before any engine starts
    evaluator = ServerEvaluator(RolloutFacts.from_run(cfg), tokenizer, rewards=None)
    rewards = evaluator.rewards = RewardPool(cfg.task, evaluator.reward_path)
    key = secrets.token_urlsafe(32)  # this engine serves this call only
    engine = EmbeddedEngine(cfg.model, cfg.rollout.engine, api_key=key).start()
    client = SGLangClient(engine.url, generate_timeout_s=cfg.rollout.engine.request_timeout_s,
                          api_key=key)
    try:
        t0 = time.monotonic()
        figures = await evaluator.figures(client, 0, samples=samples)
    finally:
        await client.close()
        rewards.close()
        engine.stop()
    # the engine's own label; the model's version is the directory's
    figures.pop("token_versions", None)
    return {"time": time.time(), "model": cfg.model.path, "policy_version": version,
            "task": cfg.task.name,
            "seconds": round(time.monotonic() - t0, 3), **figures}


def _evaluate_path(model: Path, cfg: RunConfig, config_file: Path | None,
                   samples: list | None = None) -> dict:
    """Evaluate an HF directory, or a checkpoint converted into one in a temporary directory;
    ConfigError first, before any model is read, when the task's reward cannot be loaded."""
    import dataclasses
    import tempfile

    from areal_like.settings.config import ConfigError
    from rollout_server.reward_pool import load_problem, reward_columns

    if why := load_problem(cfg.task, reward_columns(cfg.task)):
        raise ConfigError(why)
    with tempfile.TemporaryDirectory(prefix="areal-like-eval-") as tmp:
        model_dir = (_to_hf_dir(model, config_file, Path(tmp) / "hf") if _is_checkpoint(model)
                     else model)
        if (model_dir / ADAPTER_CONFIG).is_file() and not (model_dir / "config.json").is_file():
            # export.merged=true wrote the merged model beside it (the only one a model built
            # from its config, with no base directory to name, has)
            merged = model_dir / MERGED_DIR
            model_dir = (merged if (merged / "config.json").is_file()
                         else _merged(model_dir, Path(tmp) / MERGED_DIR))
        cfg = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, path=str(model_dir.resolve())),
            # a whole model (an adapter is merged above): an SGLang LoRA run's disk path is not
            # an embedded engine's; on loopback: the run's engine address may be another node's
            trainer=dataclasses.replace(cfg.trainer, lora=LoraConfig()),
            rollout=dataclasses.replace(cfg.rollout, engine=dataclasses.replace(
                cfg.rollout.engine, kind="embedded", host="127.0.0.1", port=0)))
        return asyncio.run(_evaluate_model(cfg, _version_of(model), samples))


def _refuse_untrusted(task: TaskConfig, keys: set[str], stored: Path) -> None:
    """ConfigError when the task an export stores would run code or send data the evaluator did
    not choose: a ``reward_fn`` outside ``PROJECT_REWARDS``, or any ``reward_url``, unless the
    command line names it (areal_like/SECURITY.md, "Evaluating an export")."""
    from areal_like.settings.config import ConfigError
    from areal_like.tasks.callables import reward_paths, split_function_path

    if task.reward_fn and "task.reward_fn" not in keys:
        try:
            known = all(":".join(split_function_path(p)) in PROJECT_REWARDS
                        for p in reward_paths(task))
        except ValueError:
            known = False
        if not known:
            paths = reward_paths(task)  # as the command line writes them
            shown = paths[0] if isinstance(task.reward_fn, str) else f"[{','.join(paths)}]"
            raise ConfigError(f"task.reward_fn={task.reward_fn!r} in {stored} is not one of the "
                              f"project's rewards ({', '.join(sorted(PROJECT_REWARDS))}): an "
                              "export's task file is data and names no code to run; to trust it, "
                              f"name it on the command line: task.reward_fn={shown}")
    if task.reward_url and "task.reward_url" not in keys:
        raise ConfigError(f"task.reward_url={task.reward_url!r} in {stored}: an export's task "
                          "file chooses no address to send eval data to; to trust it, name it on "
                          "the command line: task.reward_url=URL")


def _outside(model: Path) -> str | None:
    """Why evaluating ``model`` from here could import its files (None: it cannot): Python puts
    the working directory first on the path of the children eval starts (the reward's probe and
    workers, ``trainer.export``). Entries of ``sys.path`` inside ``model`` are dropped."""
    root = model.resolve()

    def inside(p: str | Path) -> bool:
        return Path(os.path.abspath(p)).resolve().is_relative_to(root)

    sys.path[:] = [p for p in sys.path if not (p and inside(p))]
    if inside(Path.cwd()):
        return (f"the working directory is inside {model}: run `areal-like eval` from outside the "
                "model's directory, so that nothing shipped in it is imported")
    return None


def _eval_config(model: Path, config_file: Path | None,
                 overrides: list[str]) -> tuple[RunConfig, Path | None]:
    """The config evaluating ``model`` runs with, and the run config it came from (None: none);
    the order of the module docstring. ConfigError when nothing says which task to score."""
    import dataclasses

    from areal_like.settings.config import (
        EXPORT_TASK_FILE,
        ConfigError,
        export_settings,
        load_daemon_config,
        task_from_yaml,
    )

    keys = {o.split("=", 1)[0] for o in overrides}
    # evaluating needs no training file
    if "task.eval_path" in keys and "task.dataset_path" not in keys:
        overrides.append("task.dataset_path=" + next(o for o in overrides
                                                     if o.startswith("task.eval_path=")
                                                     ).split("=", 1)[1])
    named = "task" in keys  # task=NAME: the user's task, whatever the model's run trained on
    if named and (model / EXPORT_TASK_FILE).is_file():
        print(f"note: scoring on the task given (task=...), not the one {model} stores in "
              f"{EXPORT_TASK_FILE}", file=sys.stderr)
    run_config = recorded = None
    if not (config_file or named):
        run_config = _default_config(model) or (recorded := _recorded_config(model))
    if config_file or run_config:
        # the model is MODEL and its settings the run's: a model=NAME has nothing left to choose
        kept = [o for o in overrides if o.split("=", 1)[0] != "model"]
        config_file = config_file or run_config
        cfg = load_daemon_config(["--config-file", str(config_file), *kept])
        if recorded:  # named by the export's own task file: its settings, not its code
            _refuse_untrusted(cfg.task, keys, recorded)
        return cfg, config_file
    stored = model / EXPORT_TASK_FILE
    if not named and stored.is_file():
        text = stored.read_text()
        # the run's eval.* and seed, each under the same key given here
        run = [o for o in export_settings(text)[0] if o.split("=", 1)[0] not in keys]
        given = [*_model_overrides(model, keys, default=None),
                 *(o for o in overrides if not o.startswith("task."))]
        cfg = load_daemon_config([*run, *given])
        task = task_from_yaml(text, [o for o in overrides if o.startswith("task.")])
        _refuse_untrusted(task, keys, stored)
        return dataclasses.replace(cfg, task=task), None
    if not any(k == "task" or k.startswith("task.") for k in keys):
        raise ConfigError(f"{model} does not say which task to score it on (no {EXPORT_TASK_FILE} "
                          "in it, no run config.yaml beside it): name one (task=NAME and its "
                          "task.* keys) or pass --config-file <run_dir>/config.yaml")
    given = [*_model_overrides(model, keys, default="local_hf"), *overrides]
    return load_daemon_config(given), None


def _model_overrides(model: Path, keys: set[str], default: str | None) -> list[str]:
    """``model=`` (``default`` unless given; a user's model takes the task's sampling settings,
    never ``model=tiny``'s recipe) and ``model.path=MODEL`` unless given, which ``model=local_hf``
    makes mandatory."""
    out = [f"model={default}"] if default and "model" not in keys else []
    if (out or "model" in keys) and "model.path" not in keys:
        out.append("model.path='{}'".format(str(model.resolve()).replace("'", "\\'")))
    return out


def _not_a_model(path: Path) -> str:
    """Why ``path`` cannot be evaluated: deleted by its run (an older ``v<version>`` beside newer
    ones: pruned), missing, or not a model."""
    if path.exists():  # e.g. a run directory: its config.yaml is not a model's
        return (f"{path} is neither a Hugging Face model directory (config.json) nor a trainer "
                "checkpoint: name one, e.g. <run_dir>/export/v<version> or "
                "<run_dir>/checkpoints/v<version>")
    parent = path.parent
    kept = sorted((p.name for p in parent.glob("v*") if p.name[1:].isdigit()),
                  key=lambda n: int(n[1:])) if parent.is_dir() else []
    if path.name[:1] == "v" and path.name[1:].isdigit() and kept and (
            int(kept[-1][1:]) > int(path.name[1:])):
        what = {"checkpoints": "checkpoints (trainer.keep_checkpoints)",
                "export": "exports (export.keep)"}.get(
            parent.name, "checkpoints and exports (trainer.keep_checkpoints, export.keep)")
        return (f"{path} was deleted by its run, which keeps only its newest {what}: "
                f"{parent} holds {', '.join(kept)}")
    return f"{path} does not exist"


def _settings_source(args, config_file: Path | None, cfg: RunConfig) -> str:
    """Where ``_eval_config`` took the task and eval settings from, in words."""
    from areal_like.settings.config import EXPORT_TASK_FILE

    if args.config_file is not None:
        return f"--config-file {args.config_file}"
    if config_file is not None:
        return f"the run's {config_file}"
    stored = args.model / EXPORT_TASK_FILE
    if stored.is_file() and not any(o.split("=", 1)[0] == "task" for o in args.overrides):
        return f"the export's {stored}"
    return f"task={cfg.task.name}'s defaults and the command line"


def _say_sampling(sampling: dict) -> None:
    """One line on stderr: how the evaluation samples, and where that comes from."""
    print(f"[eval] sampling at temperature {sampling['temperature']:g}, top_p "
          f"{sampling['top_p']:g}, top_k {sampling['top_k']}, at most "
          f"{sampling['max_new_tokens']} new tokens, {sampling['samples_per_prompt']} samples "
          f"per prompt besides the greedy one; from {sampling['from']}", file=sys.stderr,
          flush=True)


def _parser():
    import argparse

    p = argparse.ArgumentParser(prog="areal-like eval",
                                description="Evaluate an HF model directory or a trainer "
                                            "checkpoint on the task's eval split (greedy "
                                            "accuracy, pass@k, mean@k).")
    p.add_argument("model", type=Path,
                   help="an HF model directory (e.g. run_dir/export/v00000200) or a "
                        "trainer checkpoint (run_dir/checkpoints/v00000200)")
    p.add_argument("--config-file", type=Path,
                   help="the run's config.yaml (default: the one of the run the "
                        "model belongs to, when there is one)")
    p.add_argument("--out", type=Path, help="also append the result to this JSONL file")
    p.add_argument("--samples", type=Path,
                   help="write each prompt, its answers and their rewards to this JSONL file")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. eval.k=8 task.eval_path=...")
    return p


def main(argv: list[str] | None = None) -> int:
    """``areal-like eval MODEL [--config-file F] [--out FILE] [--samples FILE] [key=value ...]``:
    one JSON line."""
    from areal_like.settings.config import ConfigError
    from rollout_server.reward_pool import RewardPoolError

    args = _parser().parse_intermixed_args(argv)  # overrides after --out FILE too
    if not (_is_checkpoint(args.model) or (args.model / "config.json").is_file()
            or (args.model / ADAPTER_CONFIG).is_file()):
        print(f"error: {_not_a_model(args.model)}", file=sys.stderr)
        return 2
    if why := _outside(args.model):
        print(f"error: {why}", file=sys.stderr)
        return 2
    samples: list[dict] | None = [] if args.samples is not None else None
    try:
        cfg, config_file = _eval_config(args.model, args.config_file, list(args.overrides))
        sampling = {**sampling_settings(cfg.eval, cfg.task),
                    "from": _settings_source(args, config_file, cfg)}
        record = _evaluate_path(args.model, cfg, config_file, samples)
    except (ConfigError, RewardPoolError, EngineError, subprocess.CalledProcessError) as e:
        # RewardPoolError: reward not loadable; EngineError: the engine refused every prompt;
        # an export that refused (exit 2) printed its own error line
        if not (isinstance(e, subprocess.CalledProcessError) and e.returncode == 2):
            print(f"error: {e}", file=sys.stderr)
        return 2
    record.update(model=str(args.model), sampling=sampling)
    _say_sampling(sampling)
    print(json.dumps(record), flush=True)  # first: a bad --out never loses the evaluation
    flag = "--out"
    try:
        if args.out is not None:
            append_record(args.out, record)
        flag = "--samples"
        if args.samples is not None:
            rows = sorted(samples or [], key=lambda r: r["index"])
            args.samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    except OSError as e:
        print(f"error: {flag} {getattr(args, flag[2:])}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
