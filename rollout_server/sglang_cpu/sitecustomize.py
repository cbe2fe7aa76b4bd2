"""Pinned host memory on a machine without an accelerator, for SGLang's LoRA code on CPU.

Python imports this module at the start of every SGLang process in CPU mode (this directory is
first on their ``PYTHONPATH``, rollout_server/launch_sglang.py). It does nothing unless
``UNPINNED_ENV`` is set (a job with ``trainer.lora.rank > 0``) and torch has no accelerator.

Why: SGLang 0.5.23's LoRA layers and its ``torch_native`` LoRA backend ask for page-locked host
memory unconditionally (``lora/layers.py``: ``torch.tensor(..., pin_memory=True)`` for every
adapted layer's offsets; ``lora/backend/torch_backend.py``: ``.pin_memory()`` and
``torch.zeros(..., pin_memory=True)`` on every batch), and torch without a CUDA device refuses
it ("Found no NVIDIA driver on your system"), so a server started with ``--enable-lora`` dies
building its first LoRA layer. Pinning only makes copies to a device faster; with no device there
is no copy, and SGLang's own adapter memory pool already skips it then
(``lora/mem_pool.py``: ``is_pin_memory_available()``). So here a pinned allocation is an ordinary
one: ``torch.tensor``, ``torch.zeros`` and ``torch.empty`` ignore ``pin_memory`` and
``Tensor.pin_memory()`` returns the tensor. Nothing else changes: the adapters are SGLang's own
layers and kernels (tests/sglang/test_sglang_lora.py compares their log-probs with PEFT's).
"""

from __future__ import annotations

import functools
import os

UNPINNED_ENV = "AREAL_LIKE_SGLANG_UNPINNED"  # set by rollout_server/launch_sglang.py (sglang_env)


def _unpinned(make):
    @functools.wraps(make)
    def call(*args, pin_memory: bool = False, **kwargs):
        return make(*args, **kwargs)

    return call


def unpin() -> None:
    """Make pinned host allocations ordinary ones (only where torch has no CUDA device)."""
    import torch

    if torch.cuda.is_available():
        return
    for name in ("tensor", "zeros", "empty"):
        setattr(torch, name, _unpinned(getattr(torch, name)))
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self


if os.environ.get(UNPINNED_ENV) == "1":
    unpin()
