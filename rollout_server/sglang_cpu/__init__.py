"""SGLang's CPU mode for this project: the directory put first on the SGLang process's PYTHONPATH.

``STANDIN_DIR`` holds ``sgl_kernel/``, a pure-torch stand-in for the few CPU helpers SGLang
imports from ``sgl_kernel`` in CPU mode (its docstring says which and why). ``SITE_DIR``
(``lora_site/``), on that PYTHONPATH too only in a job with ``trainer.lora``, holds the
``sitecustomize.py`` that lets SGLang's LoRA code run without pinned memory (``lora_site``'s
docstring says why; only under ``UNPINNED_ENV``) and then runs the ``sitecustomize`` it
shadows. Only the SGLang process sees them: ``rollout_server/launch_sglang.py`` adds them for
``rollout.engine.sglang.device=cpu``.

``NO_NCCL`` is what that launch gives SGLang as its NCCL library (``SGLANG_NCCL_SO_PATH``): no
file. SGLang's CPU tensor parallelism reduces over gloo once its NCCL communicator finds no
library, as on a CPU build of torch; the CUDA build of torch SGLang is installed with brings one,
and with ``rollout.engine.tp_size>1`` the communicator then binds the ranks' ``cpu`` device as a
CUDA device and every rank fails (``ValueError: Expected a cuda device, but got: cpu``).
"""

from __future__ import annotations

from pathlib import Path

from rollout_server.sglang_cpu.lora_site import SITE_DIR, UNPINNED_ENV

__all__ = [
    "NO_NCCL", "SGLANG_VERSION", "SITE_DIR", "STANDIN_DIR", "UNPINNED_ENV", "check_sglang_version",
]

SGLANG_VERSION = (
    "0.5.23"  # the release the stand-in was checked against (its CPU imports, their semantics)
)
STANDIN_DIR = Path(__file__).resolve().parent
NO_NCCL = STANDIN_DIR / "no-libnccl.so"  # never made: loading it fails (module docstring)


def check_sglang_version(found: str | None) -> None:
    """Refuse, before SGLang is started, a release the stand-in was not checked against."""
    if found != SGLANG_VERSION:
        have = "is not installed" if found is None else f"{found} is installed"
        raise RuntimeError(
            f"SGLang on CPU (rollout.engine.sglang.device=cpu) needs sglang=={SGLANG_VERSION}, "
            f"the release the sgl_kernel stand-in in rollout_server/sglang_cpu was checked "
            f"against; sglang {have} (tests/sglang/setup_env.sh DIR makes an environment with it)"
        )
