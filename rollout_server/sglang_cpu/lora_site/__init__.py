"""Pinned host memory on a machine without an accelerator, for SGLang's LoRA code and its routed
experts' buffer on CPU.

``SITE_DIR`` (this directory) is put on the ``PYTHONPATH`` of the SGLang processes of a CPU job
with ``trainer.lora.rank > 0`` or ``trainer.routing_replay`` (rollout_server/launch_sglang.py,
which also sets ``UNPINNED_ENV``) and of no other process. Its ``sitecustomize.py`` calls
``unpin()`` at the start of each of them when torch has no accelerator, then runs the
``sitecustomize`` it shadows. ``unpin()`` is
idempotent: this module is imported by that file and by ``rollout_server.sglang_cpu`` (the
``sgl_kernel`` stand-in imports it in the same process), and wraps each function once.

Why (SGLang's LoRA code asks for pinned memory, which torch without CUDA refuses):
rollout_server/ROLLOUT.md, "LoRA adapters on SGLang". SGLang keeps the routed experts of every
token in a host buffer it page-locks with ``torch.cuda.cudart().cudaHostRegister``, which fails
without a CUDA driver: ``unpin()`` makes that registration a no-op, as page-locking serves only
copies to a device and there is none.
"""

from __future__ import annotations

import functools
from pathlib import Path

UNPINNED_ENV = "AREAL_LIKE_SGLANG_UNPINNED"  # set by rollout_server/launch_sglang.py (sglang_env)
SITE_DIR = Path(__file__).resolve().parent


def _unpinned(make):
    if getattr(make, "unpinned", False):
        return make

    @functools.wraps(make)
    def call(*args, pin_memory: bool = False, **kwargs):
        return make(*args, **kwargs)

    call.unpinned = True
    return call


def unpin() -> None:
    """Make pinned host allocations ordinary ones (only where torch has no CUDA device); a second
    call changes nothing."""
    import torch

    if torch.cuda.is_available():
        return
    for name in ("tensor", "zeros", "empty"):
        setattr(torch, name, _unpinned(getattr(torch, name)))
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    torch.cuda.cudart = lambda: _HostRegister


class _HostRegister:
    """``cudart`` without a device: registering host memory succeeds (0) and does nothing."""

    @staticmethod
    def cudaHostRegister(ptr: int, size: int, flags: int) -> int:  # noqa: N802 - CUDA's name
        return 0

    @staticmethod
    def cudaHostUnregister(ptr: int) -> int:  # noqa: N802 - CUDA's name
        return 0

