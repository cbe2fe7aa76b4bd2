"""Pure-torch versions of the ``sgl_kernel`` CPU helpers SGLang 0.5.23 calls in CPU mode.

Each computes what SGLang's own reference for it computes (the Triton kernel the CUDA path runs
instead, in the file named), so the token-slot bookkeeping and KV moves are real, not skipped.
"""

from __future__ import annotations

import ctypes

import torch


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """Request ``i``'s new KV slots into its row of the token pool:
    ``req_to_token[req_pool_indices[i],
    start_offset[i]:end_offset[i]]`` = the next ``end - start`` entries of ``out_cache_loc``, the
    requests' slots lying back to back in batch order (``assign_req_to_token_pool`` in
    ``sglang/srt/mem_cache/allocation.py``)."""
    if req_to_token.dim() != 2 or req_to_token.shape[1] != pool_len:
        raise ValueError(
            f"req_to_token of shape {tuple(req_to_token.shape)} is not [rows, pool_len={pool_len}]"
        )
    starts, ends = start_offset.tolist(), end_offset.tolist()
    taken = 0
    for row, start, end in zip(req_pool_indices.tolist(), starts, ends):
        if not 0 <= start <= end <= pool_len:
            raise ValueError(f"slots [{start}, {end}) outside a token-pool row of {pool_len}")
        req_to_token[row, start:end] = out_cache_loc[taken : taken + end - start].to(
            req_to_token.dtype
        )
        taken += end - start
    if taken > out_cache_loc.numel():
        raise ValueError(f"{taken} slots assigned but out_cache_loc holds {out_cache_loc.numel()}")


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor, strides: torch.Tensor, tgt_loc: torch.Tensor, src_loc: torch.Tensor
) -> None:
    """In every KV buffer (one address per layer and K/V in ``data_ptrs``, its row size in bytes in
    ``strides``), copy row ``src_loc[j]`` onto row ``tgt_loc[j]``; all rows are read before any is
    written, so overlapping moves are safe (``copy_all_layer_kv_cache_tiled`` in
    ``sglang/kernels/ops/kvcache/cache_move.py``)."""
    if tgt_loc.numel() != src_loc.numel():
        raise ValueError(f"{tgt_loc.numel()} target rows for {src_loc.numel()} source rows")
    if src_loc.numel() == 0:
        return
    rows = int(max(int(src_loc.max()), int(tgt_loc.max()))) + 1
    src, tgt = src_loc.to(torch.int64), tgt_loc.to(torch.int64)
    for address, stride in zip(data_ptrs.tolist(), strides.tolist()):
        raw = (ctypes.c_uint8 * (rows * int(stride))).from_address(int(address))
        buf = torch.frombuffer(raw, dtype=torch.uint8).view(rows, int(stride))
        buf[tgt] = buf[src]  # the right side is a gathered copy: read all, then write
