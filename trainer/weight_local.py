"""Weight sync without a process group, for trainer and engine on one device (trainer/WEIGHT_SYNC.md
"One GPU"): ``tensor`` (SGLang's ``/update_weights_from_tensor``: CUDA IPC handles, or on CPU
shared-memory file names) and ``disk`` (an HF directory, or a LoRA adapter in PEFT's layout).

Invariants:
- the memory a payload refers to stays alive until the push is over (every member reported, left,
  or the deadline passed); a ``tensor`` bucket's buffer lives until ``close`` and is rewritten only
  by a later push of the same bucket layout (the same IPC handle every push, so an engine opens it
  once); on disk, one version's directory, removed at the next push;
- a payload is made only from buffers this module allocated, never the model's own storage.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import shutil
import tempfile
import uuid
from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch

from areal_like.settings.config import WeightSyncConfig
from areal_like.weights.lora import is_adapter
from areal_like.weights.plan import (
    ROOT_PREFIX,  # + the writer's pid + "_": its pushes
    BucketSpec,
    SyncMember,
)
from areal_like.wire.weight_wire import layout, pack, unpack
from trainer.export import save_adapter
from trainer.weight_buckets import Sender, gather

log = logging.getLogger("trainer.weight_sync")

WEIGHTS_FILE = "model.safetensors"


def remove_orphans(tmp: str | None = None) -> list[Path]:
    """Remove (and return) the disk path's directories whose writer is gone (killed before
    ``close``); another user's, or a pid reused by a live process, stay."""
    removed = []
    for d in Path(tmp or tempfile.gettempdir()).glob(f"{ROOT_PREFIX}*_*"):
        pid = d.name[len(ROOT_PREFIX):].split("_", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            if not d.exists():
                removed.append(d)
    return removed


@contextmanager
def _shared_by_file_name() -> Iterator[None]:
    """CPU storages shared meanwhile are shared by file name (unrelated processes can open them)."""
    import torch.multiprocessing as mp

    old = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")
    try:
        yield
    finally:
        mp.set_sharing_strategy(old)


def tensor_payload(named: list[tuple[str, torch.Tensor]]) -> str:
    """SGLang's ``serialized_named_tensors`` entry (one TP rank):
    base64 of the ForkingPickler dump."""
    from multiprocessing.reduction import ForkingPickler

    buf = io.BytesIO()
    with _shared_by_file_name():
        ForkingPickler(buf).dump(named)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class LocalSender(Sender):
    """Rank 0: a push's gathered tensors and what its payloads refer to, held until ``done``."""

    PATH = ""

    def __init__(self, cfg: WeightSyncConfig, backend: str, rank: int, send_dtype: str):
        self.cfg, self.rank, self.send_dtype = cfg, rank, send_dtype
        self._model: torch.nn.Module | None = None
        self._buckets: list[BucketSpec] = []
        self._tensors: list[list[torch.Tensor]] = []  # per bucket, in the wire dtype

    def stage(self, model: torch.nn.Module, params, buckets: list[BucketSpec], report) -> None:
        tensors = [gather(params, b, self.send_dtype) for b in buckets]  # all-gathers: every rank
        if self.rank == 0:
            self._model, self._buckets, self._tensors = model, buckets, tensors
            report.bytes = sum(t.numel() * t.element_size() for ts in tensors for t in ts)

    def route(self, version: int, roster: list[tuple[str, int, str]]) -> dict:
        members = [SyncMember(server_id=s, rank_offset=1) for s, *_ in roster]  # offsets: unused
        return dict(group_name=self.cfg.group_name, master_addr=self.cfg.master_addr, master_port=0,
                    world_size=1, reform=False, members=members, path=self.PATH,
                    payloads=self.payloads(self._model, version, self._buckets, self._tensors))

    @abstractmethod
    def payloads(self, model: torch.nn.Module, version: int, buckets: list[BucketSpec],
                 tensors: list[list[torch.Tensor]]) -> list[str]:
        """The plan's ``payloads`` for ``tensors`` (per bucket, in the wire dtype)."""

    def done(self) -> None:
        """The push is over: let go of the gathered tensors."""
        self._model, self._buckets, self._tensors = None, [], []


class TensorSender(LocalSender):
    """Path ``tensor``: one payload per bucket, the bucket packed into a shared buffer kept per
    bucket layout from push to push (WEIGHT_SYNC.md, "One GPU"): every push names the same CUDA IPC
    handle (on CPU, the same shared-memory file), which an engine maps once and keeps mapped."""

    PATH = "tensor"

    def __init__(self, *args):
        super().__init__(*args)
        self._flats: dict[tuple, torch.Tensor] = {}  # bucket layout -> its shared buffer
        self._views: list[dict[str, torch.Tensor]] = []  # this push's buckets in their buffers

    def overlaps(self, buckets: list[BucketSpec]) -> bool:
        return True  # ``stage`` packs every bucket into this module's buffers

    def stage(self, model: torch.nn.Module, params, buckets: list[BucketSpec], report) -> None:
        """Also packs every bucket now, so that the push may finish in the background while the
        next step changes the model (the buffers are rewritten only after this push is over)."""
        super().stage(model, params, buckets, report)
        if self.rank == 0:
            self._views = self._pack(buckets, self._tensors)
            self._tensors = []  # the gathered copies: packed

    def payloads(self, model, version, buckets, tensors) -> list[str]:
        """The staged buckets' payloads (``tensors`` given: those, packed now)."""
        views = self._pack(buckets, tensors) if tensors else self._views
        return [tensor_payload(list(v.items())) for v in views]

    def _pack(self, buckets: list[BucketSpec], tensors: list[list[torch.Tensor]]
              ) -> list[dict[str, torch.Tensor]]:
        views = [self._bucket_views(b, ts) for b, ts in zip(buckets, tensors)]
        if tensors and tensors[0][0].device.type == "cuda":
            # an engine that keeps the handle open waits on no IPC event when it reads the bucket
            # again: the packing is complete before any payload leaves (one wait per push)
            torch.cuda.synchronize(tensors[0][0].device)
        return views

    def _bucket_views(self, b: BucketSpec, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        tensor_layout, nbytes = layout(b.names, b.dtypes, b.shapes)
        key = tuple((n, str(dt), tuple(s)) for n, dt, s, _ in tensor_layout)
        flat = self._flats.get(key)
        if flat is None or flat.device != tensors[0].device:
            flat = torch.empty(nbytes, dtype=torch.uint8, device=tensors[0].device)
            if flat.device.type == "cpu":
                with _shared_by_file_name():
                    flat.share_memory_()  # shared before the pack: the dump copies nothing
            self._flats[key] = flat
        pack(tensors, flat)
        return unpack(flat, tensor_layout)

    def done(self) -> None:
        super().done()
        self._views = []

    def close(self) -> None:
        super().close()
        self._flats = {}


class DiskSender(LocalSender):
    """Path ``disk``: one directory per push (a re-push sends the same one) under a private
    temporary directory; the last stays until the next push, all go at ``close``."""

    PATH = "disk"

    def __init__(self, *args):
        super().__init__(*args)
        self._root: Path | None = None  # the private directory versions are written under
        self._written: Path | None = None
        self._this_push: Path | None = None  # written by the push in progress

    def overlaps(self, buckets: list[BucketSpec]) -> bool:
        return all(is_adapter(n) for b in buckets for n in b.names)

    def stage(self, model: torch.nn.Module, params, buckets: list[BucketSpec], report) -> None:
        """Also: an adapter is copied to the CPU now, to be written while the next step trains."""
        super().stage(model, params, buckets, report)
        if self.rank == 0 and self.overlaps(buckets):
            self._tensors = [[t.to("cpu", copy=True) for t in ts] for ts in self._tensors]

    def payloads(self, model, version, buckets, tensors) -> list[str]:
        from safetensors.torch import save_file

        if self._this_push is not None:  # a re-push: the same bytes, already on disk
            return [str(self._this_push)]
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "save_pretrained"):
            raise RuntimeError("trainer.weight_sync.path=disk needs a Hugging Face model "
                               "(one with .config)")
        if self._root is None:
            remove_orphans()
            self._root = Path(tempfile.mkdtemp(prefix=f"{ROOT_PREFIX}{os.getpid()}_"))
        out = self._root / f"v{version}-{uuid.uuid4().hex[:6]}"  # a version pushed again: anew
        out.mkdir()
        state = {n: t.detach().to("cpu").contiguous()
                 for b, ts in zip(buckets, tensors) for n, t in zip(b.names, ts)}
        if all(is_adapter(n) for n in state):
            save_adapter(out, state, model, None)
        else:
            config.save_pretrained(str(out))
            save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
        self._written = self._this_push = out
        return [str(out)]

    def done(self) -> None:
        """The push is over: remove the directories older than the last one written."""
        super().done()
        self._this_push = None
        if self._root is not None:
            for d in self._root.iterdir():
                if d != self._written:
                    shutil.rmtree(d, ignore_errors=True)

    def close(self) -> None:
        self.done()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
