"""The flattened-bucket wire format of weight updates (SGLang's ``load_format:
"flattened_bucket"``): a bucket is ONE uint8 buffer of its tensors back to back in ``names``
order, row-major, in their wire dtype, no padding (the buckets: areal_like/weights/plan.py,
``plan_buckets``).

Invariants: ``layout`` is the only definition of the offsets (``pack`` writes and ``unpack`` reads
them; an unaligned one is refused, as SGLang does); only the functions that need torch import it.
"""

from __future__ import annotations

import math

FLATTENED = "flattened_bucket"  # SGLang's load_format of a bucket broadcast as one uint8 buffer


def torch_dtype(name: str):
    """The torch dtype named ``name`` (``"float32"`` or ``"torch.float32"``); ValueError if none."""
    import torch

    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def layout(names: list[str], dtypes: list[str], shapes: list[list[int]]) -> tuple[list[tuple], int]:
    """(name, torch dtype, shape, byte offset) per tensor of a bucket, and the bucket's bytes.
    Raises ValueError for an empty bucket, a negative dimension or an unaligned offset."""
    out, offset = [], 0
    for name, dt_name, shape in zip(names, dtypes, shapes):
        dt, shape = torch_dtype(dt_name), [int(s) for s in shape]
        if any(s < 0 for s in shape):
            raise ValueError(f"negative dimension in {name}: {shape}")
        if offset % dt.itemsize:
            raise ValueError(f"unaligned tensor {name}: byte offset {offset}, dtype {dt}")
        out.append((name, dt, shape, offset))
        offset += math.prod(shape) * dt.itemsize
    if not out:
        raise ValueError("empty bucket")
    return out, offset


def pack(tensors: list, out):
    """Copy ``tensors`` (in their wire dtype) back to back into ``out``; returns what is filled."""
    import torch

    parts = [t.reshape(-1).view(torch.uint8) for t in tensors]
    flat = out[:sum(p.numel() for p in parts)]
    torch.cat(parts, out=flat)
    return flat


def unpack(flat, tensor_layout: list[tuple]) -> dict:
    """``{name: view}``: each tensor of ``tensor_layout`` (``layout``) as a view into ``flat``."""
    return {n: flat[a:a + math.prod(s) * dt.itemsize].view(dt).view(s)
            for n, dt, s, a in tensor_layout}
