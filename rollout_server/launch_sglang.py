"""Launch and stop a real SGLang server (``python -m sglang.launch_server``) for one rollout server.

Pass-through, not a wrapper: every key of ``rollout.engine.sglang`` becomes ``--key-with-dashes
value`` verbatim (``true``: a bare flag, ``false``/``null``: omitted, a list: several values). The
server adds only what it owns: model path, host, port, ``--tp-size`` (``rollout.engine.tp_size``,
the one source of truth), ``--weight-version 0`` (our versions are integers) and ``--dtype`` from
``model.dtype`` (SGLang's default follows ``config.json``, while the trainer sends ``model.dtype``
weights), each unless configured, and ``--enable-return-routed-experts`` with routing replay.
CPU mode (``rollout.engine.sglang.device=cpu``) adds, in SGLang's environment only,
``SGLANG_USE_CPU_ENGINE=1`` and the pure-torch ``sgl_kernel`` stand-in first on
``PYTHONPATH`` (with LoRA or routed experts also its ``lora_site``:
rollout_server/sglang_cpu/lora_site/__init__.py says why), no NCCL library (``NO_NCCL`` there
says why) and, with ``tp_size>1``, each rank's CPUs (``threads_bind``); the stand-in was
checked against one SGLang release, and ``start()`` refuses another.

Its lifecycle (a session tied to the rollout server, the reaper, the health wait, why a start
failed) is ``EngineProcess``'s (rollout_server/engine_process.py). No secret is on its command
line: the engine API key goes in SGLang's ``--config`` YAML file (``write_secrets``).
"""
from __future__ import annotations

import os
import sys

from areal_like.daemon import StartRefused
from areal_like.net.auth import ENGINE_KEY_ENV
from areal_like.settings.config import EngineConfig, LoraConfig, ModelConfig
from rollout_server.engine_process import EngineProcess, as_flags

THREADS_BIND = "SGLANG_CPU_OMP_THREADS_BIND"  # SGLang on CPU: each TP rank's CPUs, '|' between


def sglang_command(model: ModelConfig, engine: EngineConfig, port: int,
                   secrets_file: str | None = None, lora: LoraConfig | None = None,
                   routed_experts: bool = False) -> list[str]:
    """The argv that starts SGLang for ``model`` with ``engine.sglang`` passed through (module
    docstring); ``routed_experts`` (trainer.routing_replay): SGLang keeps and returns the experts
    it routes each token to (``--enable-return-routed-experts``); ``secrets_file``
    (``write_secrets``: the API key) goes as ``--config``, SGLang's YAML file of options, so that
    no secret is on the command line every local user reads."""
    if not model.path:
        raise ValueError("rollout.engine.kind=sglang needs model.path (a local HF model directory)")
    if secrets_file and "config" in engine.sglang:
        raise ValueError("rollout.engine.sglang.config: SGLang takes one --config file, and the "
                         "job's passes the engine API key; give its options as "
                         "rollout.engine.sglang.<option> instead")
    opts = {"model_path": model.path, "host": engine.host, "port": port, "weight_version": "0",
            "tp_size": engine.tp_size, "dtype": model.dtype}
    if lora is not None and lora.enabled:
        opts.update(lora_options(lora, cpu_mode(engine)))
    if routed_experts:
        opts["enable_return_routed_experts"] = True
    opts.update(engine.sglang)  # a pass-through value wins, ``dtype`` included
    if secrets_file:
        opts["config"] = secrets_file
    return [sys.executable, "-m", "sglang.launch_server", *as_flags(opts)]


def write_secrets(directory: str, api_key: str) -> str:
    """SGLang's ``--config`` file holding ``api_key`` (YAML), owner-only from its creation, in the
    private ``directory``; its path. ValueError for a key starting with "-": SGLang turns the file
    into ``--api-key VALUE`` words, and its parser takes such a value for a flag."""
    import json

    if api_key.startswith("-"):
        raise ValueError(f"the engine API key ({ENGINE_KEY_ENV}) starts with '-', which SGLang "
                         "reads as a flag: choose another")
    path = os.path.join(directory, "secrets.yaml")  # SGLang reads only a .yaml/.yml file
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        # the flag's spelling (SGLang makes --api-key of it); a JSON string is a YAML string
        f.write(f"api-key: {json.dumps(api_key)}\n")
    return path


def lora_options(lora: LoraConfig, cpu: bool) -> dict:
    """SGLang's LoRA flags for ``trainer.lora``: its rank and target modules; 3 adapters a batch
    (the base model, the live adapter, an older one a retracted request still runs under); on CPU
    the pure-torch kernels (the default ``csgmv`` and ``triton`` need Triton on a GPU)."""
    opts = {"enable_lora": True, "max_lora_rank": lora.rank,
            "lora_target_modules": list(lora.target_modules), "max_loras_per_batch": 3}
    if cpu:
        opts["lora_backend"] = "torch_native"
    return opts


def cpu_mode(engine: EngineConfig) -> bool:
    """SGLang on CPU: ``rollout.engine.sglang.device=cpu`` (its own ``--device`` flag)."""
    return str(engine.sglang.get("device", "")).lower() == "cpu"


def sglang_env(engine: EngineConfig, base: dict[str, str] | None = None,
               lora: bool = False) -> dict[str, str] | None:
    """The SGLang process's environment (module docstring): ``None`` (this one's) on a GPU. On CPU
    the project's directory follows the stand-in on ``PYTHONPATH`` (its version pin is imported
    from there); ``lora``: SGLang asks for pinned host memory (LoRA, routed experts)."""
    if not cpu_mode(engine):
        return None
    from rollout_server.sglang_cpu import NO_NCCL, SITE_DIR, STANDIN_DIR, UNPINNED_ENV

    env = dict(os.environ if base is None else base)
    rest = filter(None, env.get("PYTHONPATH", "").split(os.pathsep))
    site = [str(SITE_DIR)] if lora else []
    paths = [str(STANDIN_DIR), *site, str(STANDIN_DIR.parents[1]), *rest]
    env.update(SGLANG_USE_CPU_ENGINE="1", PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)),
               SGLANG_NCCL_SO_PATH=str(NO_NCCL))
    if engine.tp_size > 1 and not env.get(THREADS_BIND):
        env[THREADS_BIND] = threads_bind(engine.tp_size, sorted(os.sched_getaffinity(0)))
    if lora:
        env[UNPINNED_ENV] = "1"
    return env


def threads_bind(tp_size: int, cpus: list[int]) -> str:
    """``THREADS_BIND`` for ``tp_size`` ranks on ``cpus``: contiguous groups, one a rank (SGLang's
    default, a NUMA node a rank, refuses more ranks than nodes); a ``StartRefused`` naming the
    key for fewer CPUs than ranks."""
    if tp_size > len(cpus):
        raise StartRefused(
            f"rollout.engine.tp_size={tp_size}: SGLang on CPU (rollout.engine.sglang.device=cpu) "
            f"runs a rank on CPUs of its own and this process may use {len(cpus)}; lower "
            f"tp_size or set {THREADS_BIND} (SGLang's 'CPUS|CPUS|...', a group a rank)")
    n = len(cpus)
    return "|".join(",".join(map(str, cpus[i * n // tp_size:(i + 1) * n // tp_size]))
                    for i in range(tp_size))


def installed_sglang() -> str | None:
    """The sglang release this interpreter (the one SGLang is started with) has, or None."""
    from importlib import metadata

    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return None


class SGLangProcess(EngineProcess):
    """One SGLang server subprocess (``EngineProcess``)."""

    NAME = "SGLang"

    def check_version(self) -> None:
        """Refuse (before anything starts) an engine release this launch was not checked with."""
        if cpu_mode(self.engine):
            from rollout_server.sglang_cpu import check_sglang_version

            check_sglang_version(installed_sglang())

    def environment(self) -> dict[str, str]:
        pinned = self.lora is not None or self.routed_experts
        return sglang_env(self.engine, lora=pinned) or dict(os.environ)

    def command(self, tmpdir: str, env: dict[str, str]) -> tuple[list[str], str | None]:
        secrets_file = write_secrets(tmpdir, self.api_key) if self.api_key else None
        return sglang_command(self.model, self.engine, self.port, secrets_file, self.lora,
                              self.routed_experts), secrets_file
