"""Typed configuration: Hydra composes ``configs/`` onto the dataclasses of ``schema.py``.

Invariants: every failure is a ``ConfigError`` whose message starts with the key (a bad group
option lists the options, a ``???`` left unset names the key, an unknown ``+key`` lists the known
keys); importing this module has no side effects and imports no torch, task, dataset or
tokenizer code (the facts a config implies: ``areal_like/job_facts.py``).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from areal_like.net.auth import redact
from areal_like.settings.config_checks import split_address
from areal_like.settings.loss_schema import AGG_MODES, ESTIMATORS, LOSS_KINDS
from areal_like.settings.report_schema import EvalConfig, ExportConfig, TrackingConfig
from areal_like.settings.schema import (
    BufferConfig,
    ConfigError,
    EngineConfig,
    LaunchConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    RolloutConfig,
    RunConfig,
    SecurityConfig,
    TaskConfig,
    TrainerConfig,
    WarmStartConfig,
    WeightSyncConfig,
)

__all__ = [
    "AGG_MODES", "ESTIMATORS", "LOSS_KINDS", "BufferConfig", "ConfigError", "EngineConfig",
    "EvalConfig", "ExportConfig", "LaunchConfig",
    "LoraConfig",
    "LossConfig", "ModelConfig", "RolloutConfig", "RunConfig", "SecurityConfig", "TaskConfig",
    "TrackingConfig", "TrainerConfig", "WarmStartConfig",
    "WeightSyncConfig", "config_dir", "from_yaml", "group_options", "load_config",
    "load_daemon_config", "to_yaml", "EXPORT_TASK_FILE", "export_yaml", "export_data",
    "export_settings", "task_from_yaml",
]

# In every exported model directory: the task it was trained on, which `areal-like eval` scores it
# on when no run config says otherwise (rollout_server/evaluate.py), with the run's eval.* and seed
# and the export's policy version (export_yaml). Hugging Face loaders ignore it.
EXPORT_TASK_FILE = "areal_like_task.yaml"
DAEMON_USAGE = "a daemon takes [--config-file PATH] [key=value ...]"


def config_dir() -> Path:
    """$AREAL_LIKE_CONFIG_DIR, else a wheel's ``areal_like/configs``, else the checkout's."""
    env = os.environ.get("AREAL_LIKE_CONFIG_DIR")
    if env:
        return Path(env).resolve()
    package = Path(__file__).resolve().parents[1]  # areal_like/
    packaged = package / "configs"
    return packaged if packaged.is_dir() else (package.parent / "configs").resolve()


def data_path(relative: str) -> str:
    """``${data:math_chat/train.parquet}``: a file shipped in ``areal_like/tasks/data/``."""
    path = Path(__file__).resolve().parents[1] / "tasks" / "data" / relative
    if not path.exists():
        raise ConfigError(f"${{data:{relative}}}: no such shipped file ({path})")
    return str(path)


def compute_dtype(device: str) -> str:
    """``${compute_dtype:${trainer.device}}``: bf16 on a GPU, fp32 elsewhere."""
    return "bfloat16" if str(device).startswith("cuda") else "float32"


CPU_MICRO_BATCH_TOKENS = 2048  # ${micro_batch_tokens:cpu}: configs/model/local_hf.yaml says why


def micro_batch_tokens(device: str) -> int:
    """``${micro_batch_tokens:${trainer.device}}``: CPU_MICRO_BATCH_TOKENS on CPU, 0 on a GPU."""
    return 0 if str(device).startswith("cuda") else CPU_MICRO_BATCH_TOKENS


@functools.cache
def schema_node(schema: type) -> Any:
    """``schema``'s defaults as a typed DictConfig, made once per process (a tenth of a CPU-second
    for RunConfig): ``OmegaConf.merge`` copies its first argument, so it is never changed."""
    from omegaconf import OmegaConf

    return OmegaConf.structured(schema)


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    for name, fn in (("data", data_path), ("compute_dtype", compute_dtype),
                     ("micro_batch_tokens", micro_batch_tokens)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def _sequence_count_wins(overrides: list[str]) -> list[str]:
    """A ``trainer.micro_batch_size`` set on the command line without a token budget beside it
    sizes the micro-batches (the token budget is then 0)."""
    keys = {ov.lstrip("+").partition("=")[0] for ov in overrides}
    if "trainer.micro_batch_size" in keys and "trainer.max_tokens_per_micro_batch" not in keys:
        return [*overrides, "trainer.max_tokens_per_micro_batch=0"]
    return overrides


# the engines' own flags and a verifiers taskset's config: any key, none of ours
PASS_THROUGH = ("rollout.engine.sglang.", "rollout.engine.vllm.", "task.env_args.",
                "task.env_args=")


def _pass_through_adds(overrides: list[str]) -> list[str]:
    """``rollout.engine.sglang.K=V`` (or ``.vllm.K=V``) adds K or sets it (Hydra's ``++``): those
    dicts hold the engine's flags, which the schema does not list, so Hydra's ``+`` for a new key
    is not asked for."""
    return [f"++{ov}" if ov.startswith(PASS_THROUGH) else ov for ov in overrides]


def compose_with_choices(overrides: list[str], config_name: str):
    """Hydra compose; returns the raw DictConfig and the chosen option of each config group."""
    overrides = _pass_through_adds(_sequence_count_wins(overrides))
    _register_resolvers()
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    # the schema is the base of config.yaml's defaults: overrides are typed against it
    if "areal_like_schema.yaml" not in ConfigStore.instance().list("/"):
        ConfigStore.instance().store(name="areal_like_schema", node=schema_node(RunConfig))
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            raw = hydra_compose(config_name, overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    choices = {k: v for k, v in raw.hydra.runtime.choices.items() if not k.startswith("hydra/")}
    with open_dict(raw):
        del raw["hydra"]
    return raw, choices


def group_options(group: str) -> list[str]:
    """The options of a config group: ``configs/<group>/*.yaml`` without the suffix."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def _check_group_overrides(overrides: list[str]) -> None:
    """``model=nope`` (or the optional ``experiment=typo``, which Hydra would skip) fails here."""
    for ov in overrides:
        key, sep, value = ov.lstrip("+~").partition("=")
        if not sep or "." in key or "/" in key or not (config_dir() / key).is_dir():
            continue
        if value not in ("null", "") and not (config_dir() / key / f"{value}.yaml").is_file():
            allowed = ", ".join(map(repr, group_options(key))) or "(the group has no options yet)"
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {allowed}")


def _mandatory_keys(group: str, option: str) -> list[str]:
    """Keys a group option marks ``???``, as full dotted keys (honouring ``# @package``)."""
    from omegaconf import DictConfig, OmegaConf

    path = config_dir() / group / f"{option}.yaml"
    if not path.is_file():
        return []
    package = group.replace("/", ".")
    for line in path.read_text().splitlines()[:5]:
        if line.startswith("# @package"):
            package = line.split(None, 2)[2].strip()
    package = ("" if package == "_global_"
               else group.replace("/", ".") if package == "_group_" else package)

    def walk(node, prefix: str):
        for k in node.keys():
            full = f"{prefix}.{k}" if prefix else str(k)
            if OmegaConf.is_missing(node, k):
                yield full
            elif isinstance(node._get_node(k), DictConfig):
                yield from walk(node[k], full)

    return list(walk(OmegaConf.load(path), package))


def _unknown_keys(obj: Any, prefix: str = "") -> list[str]:
    """Keys a ``+key=value`` override smuggled past the schema (to_object sets them as
    attributes)."""
    import dataclasses

    out = [f"{prefix}{k}" for k in vars(obj) if k not in {f.name for f in dataclasses.fields(obj)}]
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += _unknown_keys(value, f"{prefix}{f.name}.")
    return out


def load_config(overrides: list[str] | None = None, config_name: str = "config") -> RunConfig:
    """Compose, type-check and validate. Raises ConfigError naming the key on any problem."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    overrides = list(overrides or [])
    env = os.environ.get("AREAL_LIKE_CONFIG_DIR")
    if env and not (Path(env) / "config.yaml").is_file():
        raise ConfigError(f"AREAL_LIKE_CONFIG_DIR={env!r} holds no config.yaml (a copy of the "
                          "configs/ directory, or unset it)")
    _check_group_overrides(overrides)

    def build() -> RunConfig:
        raw, choices = compose_with_choices(overrides, config_name)
        for group, option in choices.items():
            for key in _mandatory_keys(group, option) if option else []:
                if OmegaConf.select(raw, key, default=None) in (None, ""):
                    raise ConfigError(f"{key} is mandatory with {group}={option}: add {key}=...")
        return OmegaConf.to_object(OmegaConf.merge(schema_node(RunConfig), raw))

    try:
        cfg = _structured(build)
    except HydraException as e:
        raise ConfigError(_explain(e)) from None
    if unknown := _unknown_keys(cfg):
        raise ConfigError(f"{unknown[0]}: not a known key ({_known_keys(unknown[0])})")
    return cfg


def _known_keys(full_key: str) -> str:
    """``trainer.nope`` -> "known keys in trainer: betas, buffer_address, ..." from the schema."""
    import dataclasses
    import typing

    cls: Any = RunConfig
    parts = full_key.split(".")
    for part in parts[:-1]:
        hints = typing.get_type_hints(cls)
        if part not in hints or not dataclasses.is_dataclass(hints[part]):
            return "see areal_like/settings/schema.py"
        cls = hints[part]
    names = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
    return f"known keys in {'.'.join(parts[:-1]) or 'the root'}: {names}"


def _explain(e: BaseException) -> str:
    """One line naming the key and the reason: the innermost keyed error of the chain."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    chain: list[BaseException] = []
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        chain.append(x)
        x = x.__cause__ or x.__context__
    for x in chain:
        if isinstance(x, ConfigError):
            return str(x)
        if isinstance(getattr(x, "override", None), str):  # hydra's OverrideParseException
            hint = ("; Hydra reads a value with ~ only in quotes ('key=\"~/path\"'), or use $HOME"
                    if "~" in x.override.partition("=")[2] else "")
            return f"override {x.override!r} does not parse: {str(x).splitlines()[0]}{hint}"
    keyed = [x for x in chain if getattr(x, "full_key", None)]
    first_lines = [str(x).strip().splitlines()[0] for x in chain if str(x).strip()]
    if keyed:
        err = keyed[-1]
        key = err.full_key  # type: ignore[attr-defined]
        reason = str(err).strip().splitlines()[0]
        context = first_lines[0] if first_lines and first_lines[0] != reason else ""
        if isinstance(err, (ConfigAttributeError, ConfigKeyError)):
            reason += f" ({_known_keys(key)})"
        return f"{key}: {reason}" + (f" [{context}]" if context else "")
    unique = list(dict.fromkeys(first_lines))
    return ": ".join(unique) if unique else type(e).__name__


def to_yaml(cfg: Any, *, redacted: bool = False) -> str:
    """``cfg`` as YAML; ``redacted``: credentials blanked, for display only."""
    from omegaconf import OmegaConf

    if redacted:
        return OmegaConf.to_yaml(OmegaConf.create(redact(
            OmegaConf.to_container(OmegaConf.structured(cfg)))))
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(text: str) -> RunConfig:
    """Rebuild a RunConfig from ``to_yaml`` output (how the launcher hands configs to daemons)."""
    from omegaconf import OmegaConf

    return _merged(RunConfig, lambda: (OmegaConf.create(text),))


def absolute_files(task: TaskConfig) -> TaskConfig:
    """``task`` with the files it names absolute (relative ones start at the working directory,
    where the daemons open them), so it reads the same from anywhere: in an export's
    ``EXPORT_TASK_FILE`` and in the run's config.yaml (``launch/job.py``, ``plan_job``), which
    ``areal-like eval`` of the run's models reads from another directory too."""
    import dataclasses

    files = {k: str(Path(v).expanduser().absolute())
             for k, v in (("dataset_path", task.dataset_path), ("eval_path", task.eval_path)) if v}
    template = Path(task.chat_template).expanduser()
    with contextlib.suppress(OSError):  # a one-line template longer than a file name can be
        if task.chat_template not in ("auto", "none") and template.is_file():
            files["chat_template"] = str(template.absolute())
    return dataclasses.replace(task, **files)


def export_yaml(task: TaskConfig, ev: EvalConfig | None = None, seed: int | None = None,
                policy_version: int | None = None, run_config: Path | None = None) -> str:
    """``EXPORT_TASK_FILE``: what ``areal-like eval`` needs of the run an export comes from, to
    give the numbers the run's own evaluation gives: a config of its ``task`` (files absolute),
    ``eval`` and ``seed`` (the evaluation's settings and sampling seeds), the
    ``policy_version`` of the weights beside it, and the ``run_config`` it was made from (eval
    reads it where it is the evaluating user's own file)."""
    from omegaconf import OmegaConf

    sections: dict[str, Any] = {"task": OmegaConf.structured(absolute_files(task))}
    if ev is not None:
        sections["eval"] = OmegaConf.structured(ev)
    if seed is not None:
        sections["seed"] = seed
    if policy_version is not None:
        sections["policy_version"] = policy_version
    if run_config is not None:
        sections["run_config"] = str(Path(run_config).absolute())
    return OmegaConf.to_yaml(OmegaConf.create(sections))


def export_data(text: str) -> dict:
    """An ``EXPORT_TASK_FILE``'s text as plain data, never configuration: YAML's safe subset, and
    no ``${...}`` anywhere (OmegaConf would resolve it: ``${oc.env:...}`` reads the evaluator's
    environment), every ``eval`` key a plain name. ConfigError naming what is refused."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{EXPORT_TASK_FILE} is not YAML: {e}".splitlines()[0]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{EXPORT_TASK_FILE} must be a mapping, not {type(data).__name__}")

    def walk(value: Any, where: str) -> None:
        if isinstance(value, str) and "${" in value:
            raise ConfigError(f"{where}: {value!r} in {EXPORT_TASK_FILE} is an interpolation; an "
                              "export's task file is data, never resolved: name the value on the "
                              "command line instead")
        for k, v in value.items() if isinstance(value, dict) else enumerate(
                value if isinstance(value, list) else ()):
            walk(k, where)
            walk(v, f"{where}.{k}" if where else str(k))

    walk(data, "")
    for k in data.get("eval") or {}:
        if not (isinstance(k, str) and k.isidentifier()):
            raise ConfigError(f"eval: {k!r} in {EXPORT_TASK_FILE} is not a setting's name")
    return data


def export_settings(text: str) -> tuple[list[str], int | None]:
    """The ``eval.*`` and ``seed`` an ``export_yaml`` text holds (``export_data``: plain data), as
    ``key=value`` overrides, and its ``policy_version``; none of them in an export written before
    they were stored."""
    import json

    stored = export_data(text)
    overrides = [f"eval.{k}={json.dumps(v)}" for k, v in (stored.get("eval") or {}).items()]
    try:
        if stored.get("seed") is not None:
            overrides.append(f"seed={int(stored['seed'])}")
        version = stored.get("policy_version")
        return overrides, None if version is None else int(version)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"seed or policy_version in {EXPORT_TASK_FILE}: {e}") from None


def _structured(build: Callable[[], Any], where: str = "") -> Any:
    """``build()`` with every error as one ConfigError naming the key; an unexpected one names
    ``where`` (else it propagates)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return build()
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e)) from None
    except Exception as e:  # a validator's ConfigError, wrapped by some omegaconf versions
        if isinstance(e.__cause__ or e.__context__, ConfigError):
            raise (e.__cause__ or e.__context__) from None
        if where:
            raise ConfigError(f"{where}: {type(e).__name__}: {e}") from None
        raise


def _merged(schema: Any, sources: Callable[[], tuple], where: str = "") -> Any:
    """What ``sources()`` returns, merged in order onto ``schema``'s defaults, as typed objects.
    ``sources`` is called inside ``_structured``, so a file or an override that does not parse is
    a ``ConfigError`` too."""
    from omegaconf import OmegaConf

    return _structured(lambda: OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema),
                                                                   *sources())), where)


def task_from_yaml(text: str, overrides: list[str] | None = None) -> TaskConfig:
    """The task of ``export_yaml`` output (``export_data``: plain data, never resolved) with
    ``task.key=value`` ``overrides`` on top."""
    from omegaconf import OmegaConf

    dotlist = list(overrides or [])
    task = export_data(text).get("task") or {}
    return _merged({"task": TaskConfig()},
                   lambda: (OmegaConf.create({"task": task}),
                            OmegaConf.from_dotlist(dotlist)))["task"]


def load_daemon_config(argv: list[str], addresses: tuple[str, ...] = ()) -> RunConfig:
    """Entry-point helper: ``[--config-file PATH] [key=value ...]`` (the overrides on top of the
    launcher's resolved YAML, or composed with Hydra). A tcp address among ``addresses`` is checked
    as ``areal-like run`` checks it (``split_address``), and port 0 is refused: only ``areal-like
    run`` picks free ports. ``-h``/``--help`` prints the entry point's docstring
    (its usage) and exits 0."""
    if "-h" in argv or "--help" in argv:
        print(inspect.cleandoc(sys.modules["__main__"].__doc__ or DAEMON_USAGE))
        raise SystemExit(0)
    cfg = _load_daemon_config(argv)
    for key in addresses:
        value = operator.attrgetter(key)(cfg)  # ipc:// (same node) has no port
        if value.startswith("tcp://") and split_address(value, key)[1] == 0:
            raise ConfigError(f"{key}={value!r} has port 0: a daemon started on its own needs the "
                              "buffer's real address (e.g. buffer.address=tcp://HOST:5555 "
                              "buffer.pub_address=tcp://HOST:5556); "
                              "`areal-like run` picks free ports itself")
    return cfg


def _load_daemon_config(argv: list[str]) -> RunConfig:
    from omegaconf import OmegaConf

    argv = list(argv)
    for i, arg in enumerate(argv):
        flag, eq, path = arg.partition("=")
        if flag == "--config-file":
            if not eq and i + 1 >= len(argv):
                raise ConfigError("--config-file needs a path")
            path = path if eq else argv[i + 1]
            del argv[i:i + (1 if eq else 2)]
            break
    else:
        path = None
    if flags := [a for a in argv if a.startswith("-")]:
        raise ConfigError(f"unknown option {flags[0]!r}: {DAEMON_USAGE} (-h for help)")
    if path is None:
        return load_config(argv)
    _register_resolvers()
    if not Path(path).is_file():
        raise ConfigError(f"--config-file {path!r} "
                          f"{'is a directory' if Path(path).is_dir() else 'does not exist'}")
    if not Path(path).read_text(errors="replace").strip():
        raise ConfigError(f"--config-file {path!r} is empty (`areal-like config [overrides] > "
                          "FILE` writes one)")
    dotlist = _file_overrides(argv)
    return _merged(RunConfig, lambda: (OmegaConf.load(path), OmegaConf.from_dotlist(dotlist)),
                   where=str(path))


def _file_overrides(argv: list[str]) -> list[str]:
    """``key=value`` overrides on top of a ``--config-file``: Hydra's ``+``/``++`` are dropped
    (the file holds every key, so an unknown one is named as such), and a config group is refused:
    groups are chosen where Hydra composes the config, not over a composed one."""
    out = []
    for arg in argv:
        key, sep, _ = (override := arg.lstrip("+")).partition("=")
        if not sep:
            raise ConfigError(f"override {arg!r} is not key=value")
        if "." not in key and (config_dir() / key).is_dir():
            raise ConfigError(f"{arg}: a config group is chosen where the config is composed "
                              f"(`areal-like config {arg} ... > FILE`), not on top of "
                              "--config-file")
        out.append(override)
    return out
