"""Trainer memory tables and a measurement tool; the accounting itself is ``launch/memory.py``
(in the wheel: ``areal-like plan`` prints it for a job).

``python -m benchmarks.memory`` prints the tables of ``trainer/MEMORY.md`` from that accounting.

``PeakTensorBytes`` measures, on any device, the peak of the bytes held by tensors created while
it is active (a dispatch mode: every op's output storage is counted until it is freed). Tensors
that existed before it started are not counted, so it measures what a computation ADDS.
"""

from __future__ import annotations

import weakref
from dataclasses import replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

from launch.memory import (
    GIB,
    QWEN2_SHAPES,
    adapter_block_params,
    estimate_critic_peak_bytes,
    estimate_lora_peak_bytes,
    estimate_peak_bytes,
    qwen2_shape,
    total_params,
)


def _plain_tensors(leaves) -> list[torch.Tensor]:
    """The plain tensors among ``leaves``, a wrapper subclass (DTensor) replaced by its inner
    tensors: its own op runs below this mode, so its local allocation is only visible through its
    output."""
    out = []
    for t in leaves:
        if is_traceable_wrapper_subclass(t):
            out += _plain_tensors([getattr(t, name) for name in t.__tensor_flatten__()[0]])
        elif type(t) is torch.Tensor and t.device.type != "meta":
            out.append(t)
    return out


class PeakTensorBytes(TorchDispatchMode):
    """``with PeakTensorBytes() as m: ...``; then ``m.peak`` (bytes) and ``m.current`` (still
    alive).

    Counts each output storage once, from its creation until its Python object is collected
    (storages keep their Python object alive as long as any tensor views them). Tensor
    subclasses (DTensor) are counted through the local tensors they wrap.
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
        for t in _plain_tensors(tree_leaves(out)):
            s = t.untyped_storage()
            if s in self._seen:
                continue
            self._seen.add(s)
            n = s.nbytes()
            self.current += n
            weakref.finalize(s, self._free, n)
        self.peak = max(self.peak, self.current)
        return out


def _fits(off: float, on: float, room: float) -> str:
    return "yes" if off <= room else "with checkpointing" if on <= room else "no"


def lora_markdown_table(ranks: tuple[int, ...] = (8, 64), tokens: int = 4096, seqs: int = 8,
                        seq_len: int = 2048, chunk: int = 512,
                        rooms_gib: tuple[float, ...] = (44.0, 13.4)) -> str:
    """The LoRA table of trainer/MEMORY.md: one GPU, ``seqs`` x ``seq_len`` tokens per step in
    micro-batches of ``tokens`` (``trainer.max_tokens_per_micro_batch``), default targets; what
    the trainer runs with ``model.dtype`` float32 (the CPU topologies: fp32 base and compute) and
    bfloat16 (the GPU topologies: a bf16 base, bf16 compute), each without and with activation
    checkpointing; whether the bf16 run fits each of ``rooms_gib``, what an 80 GB and a 24 GB GPU
    leave the trainer beside SGLang's default share (``mem_fraction_static=0.4``, less the CUDA
    contexts and SGLang's own working memory)."""
    rooms = " / ".join(f"{r:g} GiB" for r in rooms_gib)
    lines = ["| model | rank | adapter params | fp32: peak GiB | with activation checkpointing | "
             f"bf16: peak GiB | with activation checkpointing | bf16 fits {rooms} |",
             "|---" * 8 + "|"]
    many = seqs * seq_len > tokens
    for name in QWEN2_SHAPES:
        cfg = qwen2_shape(name)
        for rank in ranks:
            cells = [estimate_lora_peak_bytes(cfg, 1, tokens, rank, dtype=d, checkpointing=ck,
                                              logprob_chunk=chunk, accumulating=many).total / GIB
                     for d in ("float32", "bfloat16") for ck in (False, True)]
            a = cfg.num_hidden_layers * adapter_block_params(cfg, rank)
            figures = " | ".join(f"{x:.1f}" for x in cells)
            fits = " / ".join(_fits(*cells[2:4], room) for room in rooms_gib)
            lines.append(f"| {name} | {rank} | {a / 1e6:.1f} M | {figures} | {fits} |")
    return "\n".join(lines)


def markdown_table(seqs: int = 8, seq_len: int = 2048, micro_batch_size: int = 8,
                   worlds: tuple[int, ...] = (1, 2, 8),
                   dtype: str = "bfloat16", chunk: int = 512) -> str:
    """The table of trainer/MEMORY.md: peak GiB per GPU for each Qwen2 shape and world size, with
    and without activation checkpointing. A rank trains ceil(seqs / world) sequences, at most
    ``micro_batch_size`` per forward/backward (``trainer/step.py``)."""
    lines = ["| model | params | GPUs | tokens per micro-batch | peak GiB/GPU | "
             "with activation checkpointing "
             "| largest term |", "|---|---|---|---|---|---|---|"]
    for name in QWEN2_SHAPES:
        cfg = qwen2_shape(name)
        for world in worlds:
            tokens = min(micro_batch_size, -(-seqs // world)) * seq_len
            # more than one micro-batch per optimizer step
            many = -(-seqs // world) > micro_batch_size
            plain = estimate_peak_bytes(cfg, world, tokens, dtype, False, chunk, many)
            ckpt = estimate_peak_bytes(cfg, world, tokens, dtype, True, chunk, many)
            terms = {k: v for k, v in vars(plain).items() if k != "accumulating"}
            top = max(terms, key=terms.get)
            lines.append(f"| {name} | {total_params(cfg) / 1e9:.2f} B | {world} | {tokens} | "
                         f"{plain.total / GIB:.1f} | {ckpt.total / GIB:.1f} | "
                         f"{top} ({terms[top] / GIB:.1f}) |")
    return "\n".join(lines)


def critic_markdown_table(seqs: int = 8, seq_len: int = 2048, world: int = 8,
                          dtype: str = "bfloat16") -> str:
    """trainer/MEMORY.md's critic table: peak GiB per GPU with a critic of the policy's shape and
    with one of half its layers, beside the policy alone, on ``world`` GPUs."""
    lines = ["| model | GPUs | tokens per micro-batch | policy alone | + critic (same shape) "
             "| + critic (half the layers) | critic's held state |",
             "|---|---|---|---|---|---|---|"]
    tokens = -(-seqs // world) * seq_len
    for name in QWEN2_SHAPES:
        cfg = qwen2_shape(name)
        half = replace(cfg, num_hidden_layers=max(1, cfg.num_hidden_layers // 2))
        many = -(-seqs // world) > 8  # more than trainer.micro_batch_size=8 per step
        same = estimate_critic_peak_bytes(cfg, world, tokens, dtype, accumulating=many)
        small = estimate_critic_peak_bytes(cfg, world, tokens, dtype, accumulating=many,
                                           critic_cfg=half)
        lines.append(f"| {name} | {world} | {tokens} | {same['without_critic'] / GIB:.1f} | "
                     f"{same['peak'] / GIB:.1f} | {small['peak'] / GIB:.1f} | "
                     f"{same['critic_held'] / GIB:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
    print()
    print(lora_markdown_table())
    print()
    print(critic_markdown_table())
