"""Weight sync without a process group, for trainer and engine on one device (``weight_sync.path``).

NCCL refuses two ranks of one group on one GPU, so when ``areal-like run`` places the trainer and
an engine on the same GPU (``launch/placement.py``) the weights reach the engine another way:

* ``tensor`` (SGLang's ``/update_weights_from_tensor``): per bucket, one payload, the base64 text
  of ``ForkingPickler.dump([(name, tensor), ...])`` (what SGLang's ``MultiprocessingSerializer``
  produces; SGLang reads ``serialized_named_tensors[tp_rank]`` and loads it with
  ``load_format`` null). CUDA tensors pickle to CUDA IPC handles, so the engine maps the trainer's
  memory and copies from it, no bytes travel; CPU tensors pickle to shared-memory file names
  (torch's ``file_system`` sharing strategy: unrelated processes can open them, unlike the
  default file descriptors), which is how the path is tested without a GPU;
* ``disk`` (``/update_weights_from_disk``): rank 0 writes an HF directory (``config.json`` and
  ``model.safetensors``) under a private temporary directory and the engine loads it.

``push_local`` is ``WeightBroadcaster.push`` for these paths: every rank gathers every bucket
(``full_tensor()`` is an all-gather), rank 0 packs each bucket into one fresh buffer and makes its
payload, publishes a plan (``path``, ``payloads``; no group, ``reform`` false) and waits for the
members' reports exactly as the group path does (``_await_members``: the deadline, the roster),
then announces the version.

Invariants:
- the memory a payload refers to stays alive until the push is over (every member reported, left
  the roster, or the deadline passed): an engine copies out of it while it loads, and a load that
  started is never left reading freed memory. Cost: one copy of the weights in the wire dtype on
  the trainer's device during a push; on disk, one version's directory, removed at the next push;
- a payload is made only from buffers this module allocated, never from the model's own storage
  (sharing a CPU storage moves it into shared memory; a parameter must not move under the optimizer).
"""

from __future__ import annotations

import base64
import io
import logging
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import torch

from areal_like.lora import synced_parameters
from areal_like.protocol import Ack, BucketSpec, SyncMember, WeightSyncPlan
from trainer.weight_buckets import pack_bucket, plan_buckets

log = logging.getLogger("trainer.weight_sync")

PATHS = ("tensor", "disk")
WEIGHTS_FILE = "model.safetensors"


def tensor_payload(named: list[tuple[str, torch.Tensor]]) -> str:
    """SGLang's ``serialized_named_tensors`` entry for ``named`` (one TP rank): base64 of the
    ForkingPickler dump. CPU storages are shared by file name for the time of the dump."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing as mp

    old = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")
    try:
        buf = io.BytesIO()
        ForkingPickler(buf).dump(named)
    finally:
        mp.set_sharing_strategy(old)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class LocalSender:
    """Rank 0: the payloads of one push and the memory they refer to, held until ``release``."""

    def __init__(self, path: str):
        if path not in PATHS:
            raise ValueError(f"trainer.weight_sync.path={path!r}: the local paths are {PATHS}")
        self.path = path
        self._held: list[torch.Tensor] = []  # what the tensor payloads point into
        self._root: Path | None = None  # path=disk: the private directory versions are written under
        self._written: Path | None = None

    def payloads(self, model: torch.nn.Module, version: int, buckets: list[BucketSpec],
                 tensors: list[list[torch.Tensor]]) -> list[str]:
        """The plan's ``payloads``: one per bucket (tensor) or ``[directory]`` (disk)."""
        if self.path == "tensor":
            return [self._bucket_payload(b, ts) for b, ts in zip(buckets, tensors)]
        return [str(self._write_dir(model, version, buckets, tensors))]

    def _bucket_payload(self, b: BucketSpec, tensors: list[torch.Tensor]) -> str:
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        flat = torch.empty(nbytes, dtype=torch.uint8, device=tensors[0].device)
        if flat.device.type == "cpu":
            import torch.multiprocessing as mp

            old = mp.get_sharing_strategy()
            mp.set_sharing_strategy("file_system")
            try:
                flat.share_memory_()  # allocated in shared memory now: the dump below copies nothing
            finally:
                mp.set_sharing_strategy(old)
        pack_bucket(tensors, flat)
        self._held.append(flat)
        views, offset = [], 0
        for name, t in zip(b.names, tensors):
            n = t.numel() * t.element_size()
            views.append((name, flat[offset:offset + n].view(t.dtype).view(t.shape)))
            offset += n
        return tensor_payload(views)

    def _write_dir(self, model: torch.nn.Module, version: int, buckets: list[BucketSpec],
                   tensors: list[list[torch.Tensor]]) -> Path:
        from safetensors.torch import save_file

        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "save_pretrained"):
            raise RuntimeError("trainer.weight_sync.path=disk needs a Hugging Face model (one with .config)")
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="areal_like_weights_"))
        out = self._root / f"v{version}-{uuid.uuid4().hex[:6]}"  # a re-push of a version gets a fresh one
        out.mkdir()
        config.save_pretrained(str(out))
        state = {n: t.detach().to("cpu").contiguous() for b, ts in zip(buckets, tensors) for n, t in zip(b.names, ts)}
        save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
        self._written = out
        return out

    def release(self, keep_dir: bool = True) -> None:
        """The push is over: free the tensor buffers; remove the directories older than the last."""
        self._held.clear()
        if self._root is not None:
            for d in self._root.iterdir():
                if d != self._written or not keep_dir:
                    shutil.rmtree(d, ignore_errors=True)

    def close(self) -> None:
        self.release(keep_dir=False)
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None


def push_local(wb, model: torch.nn.Module, version: int, report, announce: int | None = None):
    """``WeightBroadcaster.push`` for ``path`` tensor/disk (a collective on all trainer ranks; ``wb``
    the broadcaster, ``report`` its fresh ``SyncReport``, ``announce`` the version told the buffer)."""
    t_start = time.monotonic()
    deadline = t_start + wb.cfg.deadline_s
    params = synced_parameters(model)  # LoRA: the adapter alone
    buckets = plan_buckets([(n, list(p.shape), wb.send_dtype) for n, p in params],
                           int(wb.cfg.bucket_mb * 1024 * 1024))
    tensors = [wb._gather(params, b) for b in buckets]  # all-gathers: every rank, every bucket
    report.transfer_s = time.monotonic() - t_start
    if wb.rank != 0:
        report.seconds = time.monotonic() - t_start
        return report
    sent = False
    try:
        roster = wb._admit(wb._roster(deadline), report)
        report.members = [s for s, _ in roster]
        if roster:
            payloads = wb._local.payloads(model, version, buckets, tensors)
            report.bytes = sum(t.numel() * t.element_size() for ts in tensors for t in ts)
            plan = _plan(wb, version, roster, buckets, payloads)
            ack = wb.client.request(plan, timeout_s=max(0.5, deadline - time.monotonic()))
            if not (isinstance(ack, Ack) and ack.status in ("ok", "accepted")):
                raise RuntimeError(f"buffer refused the plan for version {version}: {ack}")
            sent = True
            wb._await_members(version, report, deadline)
    except Exception as e:  # buffer gone, directory not writable: this version reaches nobody
        report.error = f"{type(e).__name__}: {e}"
        log.warning("weight sync v%d (%s): failed: %s", version, wb._local.path, report.error)
    finally:
        wb._local.release()
    if not sent:
        report.dropped = list(report.members)
    elif report.dropped:
        log.warning("weight sync v%d: dropped %s (missed the %.0fs deadline or failed)", version, report.dropped,
                    wb.cfg.deadline_s)
    wb._announce(version if announce is None else announce, report)
    report.seconds = time.monotonic() - t_start
    return report


def _plan(wb, version: int, roster: list[tuple[str, int]], buckets: list[BucketSpec],
          payloads: list[str]) -> WeightSyncPlan:
    members = [SyncMember(server_id=s, rank_offset=1) for s, _ in roster]  # no group: offsets are unused
    return WeightSyncPlan(policy_version=version, group_name=wb.cfg.group_name, master_addr=wb.cfg.master_addr,
                          master_port=0, world_size=1, backend=wb.backend, reform=False, members=members,
                          buckets=buckets, deadline_s=wb.cfg.deadline_s, plan_id=uuid.uuid4().hex[:12],
                          path=wb._local.path, payloads=payloads)
