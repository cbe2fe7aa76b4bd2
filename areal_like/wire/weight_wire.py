"""The flattened-bucket wire format of weight updates (SGLang's ``load_format:
"flattened_bucket"``): a bucket is ONE uint8 buffer of its tensors back to back in ``names``
order, row-major, in their wire dtype, no padding.

Invariants: ``plan_buckets`` is deterministic and gives each bucket one dtype (offsets aligned);
``layout`` is the only definition of the offsets (``pack`` writes and ``unpack`` reads them; an
unaligned one is refused, as SGLang does); only the functions that need torch import it.
"""

from __future__ import annotations

import math

from areal_like.wire.protocol import BucketSpec

FLATTENED = "flattened_bucket"  # SGLang's load_format of a bucket broadcast as one uint8 buffer
ITEMSIZE = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4,
            "int16": 2, "int8": 1, "uint8": 1, "bool": 1}


def plan_buckets(named_shapes_dtypes: list[tuple[str, list[int], str]],
                 bucket_bytes: int) -> list[BucketSpec]:
    """Buckets of at most ``bucket_bytes`` (a larger tensor alone), one dtype each, dtypes in order
    of first occurrence and tensors in order within a dtype."""
    by_dtype: dict[str, list[tuple[str, list[int]]]] = {}
    for name, shape, dt in named_shapes_dtypes:
        if dt not in ITEMSIZE:
            raise ValueError(f"{name}: unsupported dtype {dt!r}")
        by_dtype.setdefault(dt, []).append((name, [int(s) for s in shape]))
    groups: list[tuple[list, str]] = []  # (name, shape) per tensor, and the dtype, per bucket
    for dt, items in by_dtype.items():
        cur: list[tuple[str, list[int]]] = []
        cur_bytes = 0
        for name, shape in items:
            nbytes = ITEMSIZE[dt] * math.prod(shape)
            if cur and cur_bytes + nbytes > bucket_bytes:
                groups.append((cur, dt))
                cur, cur_bytes = [], 0
            cur.append((name, shape))
            cur_bytes += nbytes
        if cur:
            groups.append((cur, dt))
    return [BucketSpec(names=[n for n, _ in items], dtypes=[dt] * len(items),
                       shapes=[s for _, s in items]) for items, dt in groups]


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
