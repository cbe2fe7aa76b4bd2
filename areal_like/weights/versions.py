"""Torch, CUDA and NCCL versions of a weight-sync peer, and whether two peers may share a group
(why: areal_like/DESIGN.md section 4).

Rules (``mismatch``), applied only to what both sides know ("" is unknown): nccl: the torch
release (before ``+``), CUDA and NCCL must be equal; gloo: torch's major.minor. Invariant: a peer
reporting nothing at all is never refused (the caller warns about it).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeVersions:
    torch: str = ""  # torch.__version__, e.g. "2.14.1+cu130"
    cuda: str = ""  # torch.version.cuda: the CUDA torch was built with ("" on a CPU build)
    nccl: str = ""  # torch.cuda.nccl.version() as "2.30.7" ("" where CUDA is not available)

    def known(self) -> bool:
        return bool(self.torch or self.cuda or self.nccl)

    def __str__(self) -> str:
        return f"torch {self.torch or '?'}, CUDA {self.cuda or '?'}, NCCL {self.nccl or '?'}"


def local_versions() -> RuntimeVersions:
    """This process's torch, the CUDA it was built with and, where CUDA is available, its NCCL."""
    import torch

    nccl = ""
    if torch.cuda.is_available():
        v = torch.cuda.nccl.version()  # a tuple (2, 30, 7); an int (23007) in old releases
        nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    # str(): torch.__version__ is a TorchVersion, which the wire codec does not take as a str
    return RuntimeVersions(torch=str(torch.__version__), cuda=str(torch.version.cuda or ""),
                           nccl=nccl)


def from_server_info(info: dict[str, Any]) -> RuntimeVersions:
    """The versions an engine's ``/server_info`` reports ("" where it reports none)."""
    return RuntimeVersions(*(str(info.get(f"{k}_version") or "")
                             for k in ("torch", "cuda", "nccl")))


async def engine_versions(kind: str, server_info: dict) -> RuntimeVersions:
    """The torch, CUDA and NCCL an engine of ``rollout.engine.kind`` runs on. The embedded engine
    runs on this process's torch. An SGLang server is asked (``server_info``, its ``/server_info``
    answer); SGLang 0.5.23 does not say, so this process's are assumed: exact for a launched one
    (it runs on this interpreter, ``sys.executable``), a guess for one attached by URL."""
    local = await asyncio.to_thread(local_versions)  # the first torch import takes seconds
    if kind == "embedded":
        return local
    reported = from_server_info(server_info)
    if reported.known():
        return reported
    log.log(logging.INFO if kind in ("sglang", "vllm") else logging.WARNING,
            "the engine reports no torch/CUDA/NCCL versions: assuming this process's (%s)", local)
    return local


def _release(torch_version: str) -> str:
    return torch_version.split("+", 1)[0]


def _major_minor(torch_version: str) -> str:
    return ".".join(_release(torch_version).split(".")[:2])


def mismatch(own: RuntimeVersions, peer: RuntimeVersions, backend: str) -> str | None:
    """Why ``peer`` may not join a weight-sync group with ``own`` on ``backend``, naming both
    versions; None when it may (also when what differs is unknown on one side)."""
    if backend == "nccl":
        checks = [("torch", _release(own.torch), _release(peer.torch)),
                  ("CUDA", own.cuda, peer.cuda),
                  ("NCCL", own.nccl, peer.nccl)]
    elif backend == "gloo":
        checks = [("torch major.minor", _major_minor(own.torch), _major_minor(peer.torch))]
    else:
        raise ValueError(f"weight-sync backend {backend!r}: expected 'nccl' or 'gloo'")
    diffs = [f"{what} {mine} here, {theirs} there"
             for what, mine, theirs in checks if mine and theirs and mine != theirs]
    if not diffs:
        return None
    return f"{backend} group refused: {'; '.join(diffs)} (trainer: {own}; engine: {peer})"
