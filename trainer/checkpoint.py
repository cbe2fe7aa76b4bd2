"""Trainer checkpoints: torch.distributed.checkpoint (DCP) of model + optimizer, plus the rest.

Layout under ``trainer.checkpoint_dir``::

    v00000012/            one complete checkpoint (policy_version 12)
        .metadata, *.distcp     DCP shards of {"model", "optim"} (sharded state dicts, any world size)
        meta.pt                 policy_version, LR scheduler state, world size, checksums (rank 0)
        rng_rank{r}.pt          torch / python / numpy (/ cuda) RNG states of rank r
    .tmp_v00000013/       a save in progress (or interrupted): ignored and removed

Invariants:
- Atomic: every rank writes into a temporary directory; after a barrier, rank 0 renames it to
  its final name. A checkpoint directory either is complete or does not exist, so a crash
  (kill -9) at any moment leaves the previous checkpoint usable. The last ``KEEP`` are kept.
- ``AsyncSaver`` (``trainer.checkpoint_async``) keeps that invariant: DCP writes the shards in the
  background into the temporary directory, and the rename happens only after every rank's write
  finished (``poll`` after each step, ``finish`` at the next save or at the end); a crash meanwhile
  loses that save only.
- Resume restores model, optimizer, scheduler, policy_version and RNG states; the caller then
  re-pushes the weights and announces the version (trainer/loop.py).
- Every rank writes its own DCP shard and RNG file into the same directory, so on several nodes
  ``checkpoint_dir`` must be on a shared filesystem (rank 0 does the rename).
- The checksums in meta.pt (order-independent float64 sums over every tensor) let a resumed run
  prove it holds exactly the saved state (``state_checksums``).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from trainer.model import Policy

log = logging.getLogger("trainer.checkpoint")

KEEP = 2  # checkpoints kept on disk: the newest, plus one in case the newest is on a failing disk
PREFIX = "v"
TMP_PREFIX = ".tmp_"


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "meta.pt").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _flat_checksum(named: dict, rank_local: bool) -> float:
    total = torch.zeros((), dtype=torch.float64)
    for i, (name, t) in enumerate(sorted(named.items())):
        if not isinstance(t, torch.Tensor) or t.dim() == 0 and name.endswith("step"):
            continue  # optimizer step counters are replicated, not sharded: not summable over ranks
        local = t.to_local() if rank_local and hasattr(t, "to_local") else t
        total += local.detach().double().sum().cpu() * (1 + (i % 7) * 1e-3)
    return float(total)


def _flatten(prefix: str, obj, out: dict) -> dict:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(obj, torch.Tensor):
        out[prefix] = obj
    return out


def state_checksums(policy: Policy) -> dict[str, float]:
    """Checksums of the model and optimizer state over all ranks (a collective)."""
    model_sd, optim_sd = get_state_dict(policy.model, policy.optimizer)
    vals = torch.tensor([_flat_checksum(model_sd, True), _flat_checksum(_flatten("", optim_sd["state"], {}), True)],
                        dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(vals)
    return {"model": float(vals[0]), "optim": float(vals[1])}


def _open_tmp(root: Path, version: int) -> tuple[Path, Path]:
    """(temporary, final) directories of a save; the temporary one made empty (rank 0), then a barrier."""
    final = root / f"{PREFIX}{version:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    return tmp, final


def _write_rest(tmp: Path, policy: Policy, version: int, extra: dict | None) -> None:
    """RNG states (every rank) and meta.pt with the checksums (rank 0; the checksums are a collective)."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng_rank{_rank()}.pt")
    sums = state_checksums(policy)
    if _rank() == 0:
        torch.save({"policy_version": version, "scheduler": policy.scheduler.state_dict(),
                    "world_size": policy.world_size, "checksums": sums, "extra": dict(extra or {})},
                   tmp / "meta.pt")


def _commit(root: Path, tmp: Path, final: Path, version: int) -> None:
    """After every rank wrote: rank 0 renames the save into place and prunes old ones."""
    _barrier()
    if _rank() == 0:
        if final.exists():  # a re-save of the same version (e.g. shutdown right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(root)[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(f"{TMP_PREFIX}*"):
            if stale != tmp:
                shutil.rmtree(stale, ignore_errors=True)
        log.info("checkpoint v%d saved to %s", version, final)
    _barrier()


def save_checkpoint(root: Path, policy: Policy, version: int, extra: dict | None = None) -> Path:
    """Save on all ranks (a collective); returns the final directory. ``extra`` (rank 0's) is kept
    in the metadata (the trainer stores the id of the last batch the checkpoint includes)."""
    tmp, final = _open_tmp(root, version)
    model_sd, optim_sd = get_state_dict(policy.model, policy.optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    _write_rest(tmp, policy, version, extra)
    _commit(root, tmp, final, version)
    return final


class AsyncSaver:
    """Checkpoints written in the background (all ranks call ``save`` and ``finish``: collectives)."""

    def __init__(self, root: Path):
        self.root = root
        # DCP's background write runs collectives; a group of its own keeps them apart from training's
        self._pg = dist.new_group(backend="gloo") if dist.is_initialized() and dist.get_world_size() > 1 else None
        self._pending: tuple | None = None  # (future, tmp, final, version)

    def save(self, policy: Policy, version: int, extra: dict | None = None) -> None:
        """Stage the state and start writing it; the previous save is committed first."""
        self.finish()
        tmp, final = _open_tmp(self.root, version)
        model_sd, optim_sd = get_state_dict(policy.model, policy.optimizer)
        future = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp),
                                process_group=self._pg)
        _write_rest(tmp, policy, version, extra)
        self._pending = (future, tmp, final, version)

    def poll(self) -> None:
        """Commit the save in progress as soon as every rank's write is done (a collective: every rank
        calls it after each step), so that a crash loses only the steps since it, not a save interval more."""
        if self._pending is None:
            return
        done = torch.tensor([int(self._pending[0].done())])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if int(done):
            self.finish()

    def finish(self) -> Path | None:
        """Wait for the save in progress and commit it; returns its directory (None if none)."""
        if self._pending is None:
            return None
        future, tmp, final, version = self._pending
        self._pending = None
        future.result()
        _commit(self.root, tmp, final, version)
        return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: Path, policy: Policy) -> tuple[int, dict]:
    """Restore everything from ``path`` on all ranks; returns (policy_version, saved meta)."""
    model_sd, optim_sd = get_state_dict(policy.model, policy.optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(policy.model, policy.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    meta = torch.load(path / "meta.pt", weights_only=False)
    policy.scheduler.load_state_dict(meta["scheduler"])
    rng_file = path / f"rng_rank{_rank()}.pt"
    if rng_file.is_file():  # absent when resuming with more ranks than were saved: fresh RNG for those
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    log.info("resumed from %s (policy_version %d)", path, meta["policy_version"])
    return int(meta["policy_version"]), meta
