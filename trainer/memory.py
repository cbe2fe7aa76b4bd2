"""Trainer memory: an estimate of peak bytes per GPU from the model's shape, and a measurement of
the tensor bytes a piece of code allocates.

``estimate_peak_bytes`` is the accounting behind ``trainer/MEMORY.md``: what one trainer rank holds
at the peak of a step under FSDP2 (``trainer/model.py``): its 1/world share of the fp32 master
weights, gradients and two AdamW moments, plus the transient terms of the largest moment of the
backward pass -- one all-gathered decoder block (in compute dtype) with its gradient, the
activations kept for backward (every block's, or only the block inputs with activation
checkpointing plus one block recomputed), and one ``[chunk, vocab]`` log-prob block
(``trainer/logprobs.py``). It leaves out the CUDA context, the allocator's fragmentation and
NCCL buffers (a few GiB in practice: leave headroom).

``PeakTensorBytes`` measures, on any device, the peak of the bytes held by tensors created while
it is active (a dispatch mode: every op's output storage is counted until it is freed). Tensors
that existed before it started are not counted, so it measures what a computation ADDS.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 2**30


class PeakTensorBytes(TorchDispatchMode):
    """``with PeakTensorBytes() as m: ...``; then ``m.peak`` (bytes) and ``m.current`` (still alive).

    Counts each output storage once, from its creation until its Python object is collected
    (storages keep their Python object alive as long as any tensor views them). Tensor
    subclasses (DTensor) are counted through the plain tensors their ops produce.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: weakref.WeakSet = weakref.WeakSet()

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if type(t) is not torch.Tensor or t.device.type == "meta":
                continue
            s = t.untyped_storage()
            if s in self._seen:
                continue
            self._seen.add(s)
            n = s.nbytes()
            self.current += n
            weakref.finalize(s, self._free, n)
        self.peak = max(self.peak, self.current)
        return out
