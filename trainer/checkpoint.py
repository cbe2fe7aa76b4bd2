"""Trainer checkpoints: torch.distributed.checkpoint (DCP) of model + optimizer, plus the rest.

Layout under ``trainer.checkpoint_dir``::

    v00000012/            one complete checkpoint (policy_version 12)
        .metadata, *.distcp     DCP shards of {"model", "optim"} (any world size)
        meta.pt                 policy_version, LR scheduler state, world size, checksums (rank 0)
        rng_rank{r}.pt          RNG states of rank r
    .tmp_v00000013/       a save in progress (or interrupted): ignored and removed

Invariants:
- Atomic: every rank writes into the temporary directory; after a barrier rank 0 renames it, so a
  crash at any moment leaves the previous checkpoint usable (``AsyncSaver`` too: the rename waits
  for every rank's background write). The last ``trainer.keep_checkpoints`` are kept.
- A critic (``trainer/critic.py``) is saved in the same DCP checkpoint (``critic_model``,
  ``critic_optim``; its scheduler in meta.pt) and resumed with the policy; a checkpoint without one
  is refused for a run with one (and the other way round).
- Resume restores model, optimizer, scheduler, policy_version and RNG states; ``checkpoint_dir``
  must be shared by all nodes. meta.pt's checksums prove a resumed run holds the saved state.
- A checkpoint never holds a non-finite weight or optimizer state (``trainer/finite_guard.py``).
- Resume refuses (``StartRefused``, exit 2) a checkpoint whose model tensors have other shapes
  than the model built from the settings (changed ``model.*`` or ``trainer.lora.*``; so do
  ``areal-like export`` and, before it writes anything, ``areal-like run``:
  ``refuse_other_settings``), and one whose files cannot be read (damaged: cut short, missing,
  an empty ``.metadata``), naming it.
- Loading reads data, never code: every pickle is read with an allowlist
  (``UnsafeCheckpointError`` otherwise); a planted ``__reduce__`` is refused before it runs.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element  # DefaultLoadPlanner.load_bytes's
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from areal_like.daemon import StartRefused, fsync_dir
from areal_like.net.distributed import gloo_toward
from areal_like.settings.config import LoraConfig, ModelConfig
from areal_like.weights.hf import build_meta_model
from areal_like.weights.lora import add_adapters
from trainer.finite_guard import require_finite_state
from trainer.model import Policy
from trainer.ranks import all_ranks, barrier, local, rank_world, several

log = logging.getLogger("trainer.checkpoint")

KEEP = 2  # checkpoints kept on disk: the newest, plus one in case the newest is on a failing disk
PREFIX = "v"
TMP_PREFIX = ".tmp_"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir()
            if p.is_dir() and p.name.startswith(PREFIX) and (p / "meta.pt").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _flat_checksum(named: dict) -> float:
    total = torch.zeros((), dtype=torch.float64)
    for i, (name, t) in enumerate(sorted(named.items())):
        if not isinstance(t, torch.Tensor) or t.dim() == 0 and name.endswith("step"):
            continue  # optimizer step counters are replicated, not sharded: not summable over ranks
        total += local(t).detach().double().sum().cpu() * (1 + (i % 7) * 1e-3)
    return float(total)


def _flatten(prefix: str, obj, out: dict) -> dict:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(obj, torch.Tensor):
        out[prefix] = obj
    return out


def state_checksums(policy: Policy, critic=None) -> dict[str, float]:
    """Checksums of the model and optimizer state over all ranks (a collective); with a
    ``critic``, its own too (``critic_model``, ``critic_optim``)."""
    parts = {"": policy} | ({"critic_": critic} if critic is not None else {})
    vals = []
    for owner in parts.values():
        model_sd, optim_sd = get_state_dict(owner.model, owner.optimizer)
        vals += [_flat_checksum(model_sd), _flat_checksum(_flatten("", optim_sd["state"], {}))]
    total = torch.tensor(vals, dtype=torch.float64)
    if several():
        dist.all_reduce(total)
    names = [f"{p}{k}" for p in parts for k in ("model", "optim")]
    return dict(zip(names, map(float, total)))


def _states(policy: Policy, critic=None) -> dict:
    """The DCP state of the policy and, when given, the critic."""
    model_sd, optim_sd = get_state_dict(policy.model, policy.optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if critic is not None:
        state["critic_model"], state["critic_optim"] = get_state_dict(critic.model,
                                                                      critic.optimizer)
    return state


def open_tmp(final: Path) -> Path:
    """Rank 0: ``final``'s temporary twin beside it, made empty (what an interrupted write of the
    same name left is removed); it is written, then ``publish``-ed."""
    tmp = final.parent / f"{TMP_PREFIX}{final.name}"
    if rank_world()[0] == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    return tmp


def publish(tmp: Path, final: Path) -> None:
    """Rank 0: ``tmp`` renamed over ``final`` (a re-save of the same name replaces it)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _write_rest(tmp: Path, policy: Policy, version: int, extra: dict | None,
                critic=None) -> None:
    """RNG states (every rank) and meta.pt with the checksums
    (rank 0; the checksums are a collective)."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng_rank{rank_world()[0]}.pt")
    sums = state_checksums(policy, critic)
    if rank_world()[0] == 0:
        torch.save({"policy_version": version, "scheduler": policy.scheduler.state_dict(),
                    "world_size": policy.world_size, "checksums": sums, "extra": dict(extra or {}),
                    **({"critic_scheduler": critic.scheduler.state_dict()}
                       if critic is not None else {})},
                   tmp / "meta.pt")


def _commit(root: Path, tmp: Path, final: Path, version: int, keep: int) -> None:
    """After every rank wrote: rank 0 renames the save into place, then deletes all but the ``keep``
    newest."""
    barrier()
    if rank_world()[0] == 0:
        publish(tmp, final)  # a re-save of the same version: shutdown right after a periodic save
        fsync_dir(root)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(f"{TMP_PREFIX}*"):
            if stale != tmp:
                shutil.rmtree(stale, ignore_errors=True)
        log.info("checkpoint v%d saved to %s", version, final)
    barrier()


def save_checkpoint(root: Path, policy: Policy, version: int, extra: dict | None = None,
                    keep: int = KEEP, critic=None) -> Path:
    """Save on all ranks (a collective); the final directory. ``extra`` (rank 0's) is kept in the
    metadata. ``NonFiniteStateError`` (every rank, nothing written) for a non-finite state."""
    tmp, final, _ = _begin(root, policy, version, extra, dcp.save, critic=critic)
    _commit(root, tmp, final, version, keep)
    return final


def _begin(root: Path, policy: Policy, version: int, extra: dict | None, save, critic=None,
           **kwargs):
    """Check the state, open the temporary directory and write into it (``save``: DCP's save or
    async_save, whose result is returned); (tmp, final, that result)."""
    require_finite_state(policy.model, policy.optimizer)
    if critic is not None:
        require_finite_state(critic.model, critic.optimizer)
    final = root / f"{PREFIX}{version:08d}"
    tmp = open_tmp(final)
    barrier()
    result = save(_states(policy, critic), checkpoint_id=str(tmp), **kwargs)
    _write_rest(tmp, policy, version, extra, critic)
    return tmp, final, result


class AsyncSaver:
    """Checkpoints written in the background
    (all ranks call ``save`` and ``finish``: collectives)."""

    def __init__(self, root: Path, keep: int = KEEP):
        self.root, self.keep = root, keep
        # DCP's background write runs collectives;
        # a group of its own keeps them apart from training's
        with gloo_toward(os.environ.get("MASTER_ADDR")):  # as the default group (trainer/model.py)
            self._pg = dist.new_group(backend="gloo") if several() else None
        self._pending: tuple | None = None  # (future, tmp, final, version)

    def save(self, policy: Policy, version: int, extra: dict | None = None,
             critic=None) -> None:
        """Stage the state and start writing it; the previous save is committed first."""
        self.finish()
        tmp, final, future = _begin(self.root, policy, version, extra, dcp.async_save,
                                    critic=critic, process_group=self._pg)
        self._pending = (future, tmp, final, version)

    def poll(self) -> None:
        """Commit the save in progress once every rank's write is done (a collective, each step)."""
        if self._pending is None:
            return
        if all_ranks(self._pending[0].done()):
            self.finish()

    def finish(self) -> Path | None:
        """Wait for the save in progress and commit it; returns its directory (None if none)."""
        if self._pending is None:
            return None
        future, tmp, final, version = self._pending
        self._pending = None
        future.result()
        _commit(self.root, tmp, final, version, self.keep)
        return final


class UnsafeCheckpointError(StartRefused):
    """A checkpoint file holds something other than tensors and plain data (planted, or not
    ours): a refusal (exit 2), since a restart would read the same file."""


# What DCP's .metadata pickle may name (besides torch dtypes): its metadata classes and their parts
_DCP_GLOBALS = {("torch.distributed.checkpoint.metadata", n) for n in (
    "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
    "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _DCP_GLOBALS or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def _refused(path: Path | str, e: Exception) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f"{path} holds objects other than tensors and plain data "
                                 f"({str(e)[:300]}): refusing to load it (planted, or not written "
                                 "by this trainer)")


def read_dcp_metadata(path: Path) -> Metadata:
    """The DCP ``.metadata`` of checkpoint ``path``, unpickled with an allowlist."""
    file = path / ".metadata"
    try:
        with file.open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, AttributeError, TypeError, ValueError, EOFError) as e:
        if file.stat().st_size == 0 or "truncated" in str(e):  # not planted: empty or cut short
            raise _damaged(path, EOFError(f"{file.name} is " + (
                "empty" if file.stat().st_size == 0 else "cut short"))) from None
        raise _refused(file, e) from None
    if not isinstance(metadata, Metadata):
        raise _refused(file, TypeError(f"a {type(metadata).__name__}, not DCP Metadata"))
    return metadata


class _SafeReader(dcp.FileSystemReader):
    """DCP's file reader with ``.metadata`` read by ``read_dcp_metadata`` (DCP unpickles it
    freely)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_dcp_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """DCP's values that are not tensors (optimizer hyper-parameters) read with ``weights_only``
    (DCP's own ``load_bytes`` unpickles them freely). What it would do with the value, done with
    the value read here: the checkpoint's bytes are never parsed by an unrestricted unpickler
    (checking them first and letting DCP parse them again would trust two parsers to agree)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise _refused(f"checkpoint value {fqn}", e) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def _rng_globals() -> list:
    """numpy's RNG state is (name, uint32 array, ints, float): the constructors of such an array."""
    reconstruct = np.zeros(1, np.uint32).__reduce__()[0]
    return [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def dcp_load(state: dict, path: Path, no_dist: bool = False) -> None:
    """``dcp.load`` of checkpoint ``path`` into ``state``, reading data only (module docstring)."""
    read_dcp_metadata(path)  # a clear error here rather than DCP's wrapped one
    try:
        dcp.load(state, storage_reader=_SafeReader(str(path)), planner=_SafePlanner(),
                 no_dist=no_dist)
    except CheckpointException as e:  # a BaseException: each rank's reason, wrapped by DCP
        refused = [exc for exc, _ in e.failures.values() if isinstance(exc, UnsafeCheckpointError)]
        if refused:
            raise refused[0] from None
        raise _damaged(path, next(iter(e.failures.values()))[0]) from None  # a file cut short


def _agree(error: Exception | None, path: Path) -> None:
    """Raise on every rank when any rank's files were refused (a collective), so that no rank waits
    in DCP's load for one that gave up."""
    ok = all_ranks(error is None)
    if error is not None:
        raise error
    if not ok:
        raise UnsafeCheckpointError(f"{path}: another rank refused its checkpoint files (see its "
                                    "log)")


def load_data(path: Path, numpy_arrays: bool = False):
    """``torch.load`` of a checkpoint file, data only (``UnsafeCheckpointError`` otherwise)."""
    try:
        with torch.serialization.safe_globals(_rng_globals() if numpy_arrays else []):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refused(path, e) from None


def _shape(saved) -> tuple[int, ...] | None:
    """A tensor's shape in checkpoint metadata (None: not saved there)."""
    return tuple(saved.size) if saved is not None and hasattr(saved, "size") else None


def _damaged(path: Path, e: BaseException) -> StartRefused:
    """The refusal of a checkpoint whose files cannot be read, saying how to go on."""
    reason = str(e).replace("\n", ". ").split(". ")[0][:200]  # its first sentence
    why = f"{type(e).__name__}: {reason}" if reason else type(e).__name__
    earlier = [p.name for p in list_checkpoints(path.parent) if p.name < path.name]
    return StartRefused(f"checkpoint {path} cannot be read ({why}): it is "
                        "damaged; " + (f"move it out of {path.parent} to resume from {earlier[-1]}"
                                       " before it, or " if earlier else "") + "use a new run_dir")


def refuse_other_shapes(path: Path, saved: dict, model_sd: dict, advice: str) -> None:
    """StartRefused, ending in ``advice``, when the model tensors of checkpoint ``path`` (``saved``:
    its ``state_dict_metadata``) have other shapes than ``model_sd``'s: other settings, not damage
    (DCP's own error was reported as a damaged checkpoint)."""
    shapes = {k: (_shape(saved.get(f"model.{k}")), tuple(t.shape)) for k, t in model_sd.items()}
    if misfits := [f"{k}: saved {old}, this model {new}" for k, (old, new) in shapes.items()
                   if old != new]:
        raise StartRefused(f"{path} holds another model's weights ({len(misfits)} tensors differ, "
                           f"e.g. {misfits[0]}): {advice}")


def refuse_other_settings(path: Path, model_cfg: ModelConfig, lora: LoraConfig,
                          advice: str) -> None:
    """``refuse_other_shapes`` against the model that ``model_cfg`` and ``lora`` build, on the meta
    device (no memory), for a caller that has none built: ``areal-like run`` before it writes
    anything of a resume (launch/job.py), ``areal-like export`` before it builds one."""
    model = build_meta_model(model_cfg)
    if lora.enabled:
        add_adapters(model, lora)
    refuse_other_shapes(path, read_dcp_metadata(path).state_dict_metadata, model.state_dict(),
                        advice)


def load_checkpoint(path: Path, policy: Policy, critic=None) -> tuple[int, dict]:
    """Restore everything from ``path`` on all ranks (``critic``: its state too); returns
    (policy_version, saved meta)."""
    state = _states(policy, critic)
    model_sd = state["model"]
    meta = rng = error = None
    try:  # first: a planted file fails before anything is read
        meta = load_data(path / "meta.pt")
        rng_file = path / f"rng_rank{rank_world()[0]}.pt"
        rng = load_data(rng_file, numpy_arrays=True) if rng_file.is_file() else None
        saved = read_dcp_metadata(path).state_dict_metadata
    except StartRefused as e:  # a planted file (UnsafeCheckpointError) or a damaged .metadata
        error = e
    except Exception as e:  # noqa: BLE001 (a file cut short or missing: torch's RuntimeError, ...)
        error = _damaged(path, e)
    _agree(error, path)
    refuse_other_shapes(path, saved, model_sd, "resume with the model.* and trainer.lora.* "
                        "settings it was saved with, or use a new run_dir")
    if (critic is not None) != ("critic_scheduler" in meta):
        raise StartRefused(f"{path} was saved {'without' if critic is not None else 'with'} a "
                           "critic: resume with the trainer.critic.enabled it was saved with, or "
                           "use a new run_dir")
    dcp_load(state, path)
    set_state_dict(policy.model, policy.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    policy.scheduler.load_state_dict(meta["scheduler"])
    if critic is not None:
        set_state_dict(critic.model, critic.optimizer, model_state_dict=state["critic_model"],
                       optim_state_dict=state["critic_optim"])
        critic.scheduler.load_state_dict(meta["critic_scheduler"])
    if rng is not None:  # absent when resuming with more ranks than were saved: fresh RNG for those
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    log.info("resumed from %s (policy_version %d)", path, meta["policy_version"])
    return int(meta["policy_version"]), meta
