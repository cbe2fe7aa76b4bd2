"""Receive side of weight updates: the update group, the begin/end session, and loading.

Flow (SGLang 0.5.23 semantics, specs/sglang.md 2.4): ``init_group`` joins the TCP-rendezvous
group as rank ``rank_offset`` (blocks until the trainer joins; callers run it off the event
loop); ``begin`` opens a session; each ``update_from_distributed`` receives one bucket with
``dist.broadcast(buf, group_src=0, group=pg)`` per tensor in ``names`` order into fresh buffers,
then hands the whole bucket to the scheduler thread, which copies it into the parameters between
two forward passes (``Scheduler.call``), so no forward pass ever mixes two versions; ``end``
closes the session. Updates outside a session are refused, as 0.5.23 does. A bucket is applied
all-or-nothing: every tensor is received first (the broadcast must be drained even when a name is
unknown, or the sender would hang), then checked, then copied.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

import torch

from areal_like.config import ModelConfig

log = logging.getLogger(__name__)

APPLY_TIMEOUT_S = 300.0  # copying a bucket waits for the current forward pass to end; generous under load
NO_SESSION = ("update_weights_from_distributed must run between begin_weight_update() and end_weight_update()")
NOT_FLUSHED = ("Weights were updated, but the cache was not flushed because requests are still running or "
               "queued. Retract or finish them, then call /flush_cache.")


class WeightUpdater:
    def __init__(self, scheduler, model_cfg: ModelConfig, group_timeout_s: float):
        self.scheduler = scheduler
        self.model_cfg = model_cfg
        self.group_timeout_s = group_timeout_s
        self.groups: dict[str, object] = {}
        self.session_open = False
        self._recv_lock = threading.Lock()  # one bucket at a time: broadcasts must not interleave

    # ---- group lifecycle (blocking)
    def init_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                   group_name: str, backend: str) -> tuple[bool, str]:
        from areal_like.distributed import init_weight_group

        if group_name in self.groups:
            return False, f"Group {group_name} already exists; destroy it first."
        try:
            pg = init_weight_group(backend, master_address, master_port, world_size, rank_offset, group_name,
                                   self.group_timeout_s)
        except Exception as e:
            log.warning("init_weights_update_group %s failed: %s", group_name, e)
            return False, f"Failed to initialize custom process group: {e}."
        self.groups[group_name] = pg
        return True, "Succeeded to initialize custom process group."

    def destroy_group(self, group_name: str) -> tuple[bool, str]:
        from areal_like.distributed import destroy_weight_group

        pg = self.groups.pop(group_name, None)
        if pg is None:
            return False, f"Group {group_name} not in process groups."
        destroy_weight_group(pg)
        return True, "Succeeded to destroy custom process group."

    def close(self) -> None:
        for name in list(self.groups):
            self.destroy_group(name)

    # ---- session
    def begin(self) -> tuple[bool, str]:
        if self.session_open:
            return False, "a weight-update session is already open; call end_weight_update() first"
        self.session_open = True
        return True, "Success"

    def end(self) -> tuple[bool, str]:
        if not self.session_open:
            return False, "no weight-update session is open; call begin_weight_update() first"
        self.session_open = False
        return True, "Success"

    # ---- loading (blocking; called from executor threads)
    def update_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                group_name: str, weight_version: str | None, flush_cache: bool) -> tuple[bool, str]:
        if not self.session_open:
            return False, NO_SESSION
        if not len(names) == len(dtypes) == len(shapes):
            return False, "names, dtypes and shapes must have the same length"
        pg = self.groups.get(group_name)
        if pg is None:
            return False, f"Group {group_name} not in process groups."
        import torch.distributed as dist

        device = self.scheduler.device
        with self._recv_lock:
            try:
                if device.type == "cuda":  # NCCL binds its communicator to this thread's current device
                    torch.cuda.set_device(device)
                bufs = [torch.empty(shape, dtype=_dtype(dt), device=device) for dt, shape in zip(dtypes, shapes)]
                for buf in bufs:
                    dist.broadcast(buf, group_src=0, group=pg)
                if device.type == "cuda":  # the bucket is complete before the scheduler copies it
                    torch.cuda.synchronize(device)
            except Exception as e:
                return False, f"Failed to receive weights: {e}"
            return self._apply(dict(zip(names, bufs)), weight_version, flush_cache)

    def update_from_disk(self, model_path: str, weight_version: str | None, flush_cache: bool) -> tuple[bool, str]:
        from areal_like.hf import build_model

        try:
            loaded = build_model(replace(self.model_cfg, path=model_path), device="cpu")
        except Exception as e:
            return False, f"Failed to load weights from {model_path}: {e}"
        with self._recv_lock:
            return self._apply(dict(loaded.state_dict()), weight_version, flush_cache)

    def _apply(self, tensors: dict[str, torch.Tensor], weight_version: str | None,
               flush_cache: bool) -> tuple[bool, str]:
        def copy_between_steps(sched) -> tuple[bool, str]:
            state = sched.model.state_dict()
            for name, t in tensors.items():
                if name not in state:
                    return False, f"Unknown parameter {name!r}; nothing was loaded."
                if tuple(state[name].shape) != tuple(t.shape):
                    return False, (f"Shape mismatch for {name}: engine {tuple(state[name].shape)}, "
                                   f"received {tuple(t.shape)}; nothing was loaded.")
            with torch.no_grad():
                for name, t in tensors.items():
                    state[name].copy_(t)
            if weight_version is not None:
                sched.weight_version = weight_version
            if flush_cache and not sched.flush():
                return False, NOT_FLUSHED
            return True, "Succeeded to update parameter online."

        t0 = time.monotonic()
        ok, msg = self.scheduler.call(copy_between_steps).result(timeout=APPLY_TIMEOUT_S)
        log.info("weights %s (%d tensors, version %s) in %.3fs", "loaded" if ok else f"refused: {msg}",
                 len(tensors), weight_version, time.monotonic() - t0)
        return ok, msg


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt
