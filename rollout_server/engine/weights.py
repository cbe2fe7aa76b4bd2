"""Receive side of weight updates: the update group, the begin/end session, and loading
(ENGINE.md, "Weight updates, receive side").

Invariants: a bucket is loaded on the scheduler thread between two forward passes, all-or-nothing,
in request order; every byte of a broadcast is received, even for a bucket then refused, so the
sender never hangs; a bucket answered before its load failed fails the rest of its session, so
the version of the last bucket is never set over it. Swap: a flat buffer is only ever viewed by
the parameters of its own layout, and a swap re-points all of them, so the buffer it retires is
viewed by no parameter. A tensor payload is unpickled only through ``_TensorUnpickler``, which
resolves exactly the torch rebuild functions, types and dtypes such a payload names and refuses
anything else (no module as a whole, no builtin, no dotted name such as ``os.system``).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import pickle
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, InvalidStateError, wait
from dataclasses import replace

import torch

from areal_like.settings.config import ModelConfig
from areal_like.wire.weight_wire import FLATTENED, layout, torch_dtype, unpack

log = logging.getLogger(__name__)

NO_SESSION = ("update_weights_from_distributed must run between begin_weight_update() and "
              "end_weight_update()")
NOT_FLUSHED = ("Weights were updated, but the cache was not flushed because "
               "requests are still running or "
               "queued. Retract or finish them, then call /flush_cache.")
# exactly what torch's reducers (torch/multiprocessing/reductions.py) name for the dense CPU and
# CUDA tensors a payload holds (trainer/weight_local.py, ``tensor_payload``; SGLang's senders), plus
# the dtypes (``torch.float32``, ...): no module as a whole, no ``getattr``, no dotted name
_ALLOWED = {
    ("torch.multiprocessing.reductions", name) for name in (
        "rebuild_tensor", "rebuild_cuda_tensor", "rebuild_typed_storage",
        "rebuild_storage_filename", "rebuild_storage_empty")
} | {("torch", "Tensor"), ("torch", "Size"), ("torch", "UntypedStorage"), ("torch", "TypedStorage"),
     ("torch.storage", "UntypedStorage"), ("torch.storage", "TypedStorage")}


class WeightUpdater:
    def __init__(self, scheduler, model_cfg: ModelConfig, group_timeout_s: float,
                 door_key: str | None = None):
        self.scheduler = scheduler
        self.door_key = door_key  # the engine API key: its door proves it to the group's gate
        self.model_cfg = model_cfg
        self.group_timeout_s = group_timeout_s
        self.groups: dict[str, object] = {}
        self.session_open = False
        self._recv_lock = threading.Lock()  # one bucket at a time: broadcasts must not interleave
        # layout -> the flat buffer its parameters view now
        self._live: dict[tuple, torch.Tensor] = {}
        # layout -> a free buffer the next bucket is received into
        self._spare: dict[tuple, torch.Tensor] = {}
        # layout -> the sender's shared bucket buffer (a tensor payload), kept mapped: its next
        # push names the same IPC handle, which torch then finds open (update_from_tensor)
        self._mapped: dict[tuple, torch.Tensor] = {}
        # a bucket of this session answered before its load/receive failed later
        self._deferred_error = ""
        # +1 per begin(): a request of an abandoned session never posts a receive
        self._session_id = 0
        self._early: list[Future] = []  # buckets answered before their load finished (end waits)
        self._checkpoint_slices: dict | None = None  # made at the first load (``_slices``)
        self._state: LiveState | None = None  # the model's state by name (``_live_state``)

    # ---- group lifecycle (blocking)
    def init_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                   group_name: str, backend: str) -> tuple[bool, str]:
        from areal_like.net.distributed import init_weight_group

        if group_name in self.groups:
            return False, f"Group {group_name} already exists; destroy it first."
        try:
            pg = init_weight_group(backend, master_address, master_port, world_size,
                                   rank_offset, group_name,
                                   self.group_timeout_s, key=self.door_key)
        except Exception as e:
            log.warning("init_weights_update_group %s failed: %s", group_name, e)
            return False, f"Failed to initialize custom process group: {e}."
        self.groups[group_name] = pg
        return True, "Succeeded to initialize custom process group."

    def destroy_group(self, group_name: str) -> tuple[bool, str]:
        from areal_like.net.distributed import destroy_weight_group

        pg = self.groups.pop(group_name, None)
        # receive buffers are only worth keeping while a group streams into them
        self._spare.clear()
        if pg is None:
            return False, f"Group {group_name} not in process groups."
        destroy_weight_group(pg)
        return True, "Succeeded to destroy custom process group."

    def close(self) -> None:
        for name in list(self.groups):
            self.destroy_group(name)
        self._mapped.clear()

    # ---- session
    def begin(self) -> tuple[bool, str]:
        if self.session_open:
            return False, "a weight-update session is already open; call end_weight_update() first"
        self.session_open = True
        self._deferred_error = ""
        self._session_id += 1
        return True, "Success"

    @property
    def unsettled(self) -> bool:
        """Whether a bucket answered early is still being received or loaded (``end`` would
        wait)."""
        return not all(f.done() for f in self._early)

    def end(self) -> tuple[bool, str]:
        """Close the session once every bucket answered early is received and loaded: a client whose
        last bucket set neither version nor flush learns here whether it arrived."""
        if not self.session_open:
            return False, "no weight-update session is open; call begin_weight_update() first"
        _, left = wait(list(self._early), timeout=self.group_timeout_s)
        self._early = [f for f in self._early if not f.done()]
        self.session_open = False
        if left:
            return False, "an earlier bucket of this update is still being received"
        if self._deferred_error:
            return False, self._deferred_error
        return True, "Success"

    # ---- loading (blocking; called from executor threads)
    def update_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                group_name: str, load_format: str | None, paused: bool,
                                weight_version: str | None,
                                flush_cache: bool) -> tuple[bool, str] | Future:
        """(ok, message), or a Future of it. Only while ``paused`` may a bucket be answered before
        its receive completed (else a request let in after the answer could see it land)."""
        if not self.session_open:
            return False, NO_SESSION
        if not len(names) == len(dtypes) == len(shapes):
            return False, "names, dtypes and shapes must have the same length"
        pg = self.groups.get(group_name)
        if pg is None:
            return False, f"Group {group_name} not in process groups."
        if load_format == FLATTENED:
            return self._update_flattened(names, dtypes, shapes, pg,
                                          weight_version, flush_cache, paused)
        import torch.distributed as dist

        device = self.scheduler.device
        with self._recv_lock:
            try:
                # NCCL binds its communicator to this thread's current device
                if device.type == "cuda":
                    torch.cuda.set_device(device)
                bufs = [torch.empty(shape, dtype=torch_dtype(dt), device=device)
                        for dt, shape in zip(dtypes, shapes)]
                for buf in bufs:
                    dist.broadcast(buf, group_src=0, group=pg)
                if device.type == "cuda":  # the bucket is complete before the scheduler copies it
                    torch.cuda.synchronize(device)
            except Exception as e:
                return False, f"Failed to receive weights: {e}"
            return self._apply(dict(zip(names, bufs)), weight_version, flush_cache)

    def load(self, tensors: dict[str, torch.Tensor], weight_version: str | None,
             flush_cache: bool) -> tuple[bool, str] | Future:
        """Load ``tensors`` already here (a payload, a checkpoint) like any bucket, copied."""
        with self._recv_lock:
            return self._apply(tensors, weight_version, flush_cache)

    def update_from_disk(self, model_path: str, weight_version: str | None,
                         flush_cache: bool) -> tuple[bool, str] | Future:
        from areal_like.weights.hf import build_model

        try:
            loaded = build_model(replace(self.model_cfg, path=model_path), device="cpu")
        except Exception as e:
            return False, f"Failed to load weights from {model_path}: {e}"
        return self.load(dict(loaded.state_dict()), weight_version, flush_cache)

    def update_from_tensor(self, payloads: list, load_format: str | None,
                           weight_version: str | None,
                           flush_cache: bool) -> tuple[bool, str] | Future:
        """Decode this rank's payload (the first) and load it like any bucket (a copy out of the
        sender's memory; ENGINE.md)."""
        # a list of (name, tensor); SGLang's "flattened_bucket" needs its own classes
        if load_format not in (None, "auto"):
            return False, (f"load_format={load_format!r} is not supported by the embedded engine "
                           "(use null)")
        if not payloads:
            return False, "serialized_named_tensors is empty"
        try:
            tensors = decode_named_tensors(payloads[0])
        except ValueError as e:
            return False, f"Failed to update weights from tensor: {e}"
        bucket = _one_buffer(tensors)
        if bucket is None:
            return self.load(tensors, weight_version, flush_cache)
        key, tensor_layout, src = bucket
        with self._recv_lock:
            self._mapped[key] = src
            flat = self._spare.pop(key, None)
            if flat is None or flat.device != self.scheduler.device:
                flat = torch.empty(src.numel(), dtype=torch.uint8, device=self.scheduler.device)
            flat.copy_(src)  # the bucket's one copy; the sender may rewrite src once answered
            if flat.device.type == "cuda":
                torch.cuda.current_stream(flat.device).synchronize()
            return self._apply(unpack(flat, tensor_layout), weight_version, flush_cache,
                               swap=(key, flat))

    def _update_flattened(self, names: list[str], dtypes: list[str], shapes: list[list[int]], pg,
                          weight_version: str | None, flush_cache: bool,
                          paused: bool) -> tuple[bool, str] | Future:
        """One bucket as one uint8 broadcast; a bucket answered early (ENGINE.md) holds
        ``_recv_lock`` until its receive completed and its load is queued (bucket order)."""
        import torch.distributed as dist

        try:
            tensor_layout, nbytes = layout(names, dtypes, shapes)
        except ValueError as e:
            # nothing was posted, so the sender's broadcast fails on its own deadline
            return False, f"Failed to receive weights: {e}"
        device = self.scheduler.device
        key = tuple((n, str(dt), tuple(s)) for n, dt, s, _ in tensor_layout)
        session = self._session_id
        # released when the receive completed
        if not self._recv_lock.acquire(timeout=self.group_timeout_s):
            return False, "Failed to receive weights: an earlier bucket is still being received"
        stale = session != self._session_id or not self.session_open  # an abandoned session's
        refusal = NO_SESSION if stale else self._deferred_error
        if refusal:
            self._recv_lock.release()
            return False, refusal
        try:
            if device.type == "cuda":  # NCCL binds its communicator to this thread's current device
                torch.cuda.set_device(device)
            flat = self._spare.pop(key, None)
            if flat is None or flat.device != device:
                flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
            work = dist.broadcast(flat, group_src=0, group=pg, async_op=True)
        except Exception as e:
            self._recv_lock.release()
            return False, f"Failed to receive weights: {e}"
        tensors = unpack(flat, tensor_layout)
        # gloo's completion callback queues the load itself: one thread hop less
        if device.type == "cpu":
            early = weight_version is None and not flush_cache and paused
            early = early and not self._refusal(self._live_state(self.scheduler.model), tensors)
            done: Future = Future()
            work.get_future().then(lambda fut: self._received(
                fut, tensors, (key, flat), (weight_version, flush_cache), done,
                session if early else None))
            if not early:
                return done
            self._early.append(done)  # answered before its receive completed: end() waits for it
            return True, "Succeeded to update parameter online."
        try:
            work.wait()
            # the bucket is complete before the scheduler swaps it in
            torch.cuda.synchronize(device)
        except Exception as e:
            return False, f"Failed to receive weights: {e}"
        finally:
            self._recv_lock.release()
        return self._apply(tensors, weight_version, flush_cache, swap=(key, flat))

    def _received(self, fut, tensors: dict[str, torch.Tensor], swap: tuple[tuple, torch.Tensor],
                  label: tuple[str | None, bool], done: Future, early_session: int | None) -> None:
        """A bucket's receive completed (gloo's thread; must not block): queue its load, then let
        the next bucket's receive be posted. ``done`` gets the answer."""
        try:
            fut.value()  # raises if the receive failed (the sender died, the group broke)
            out = self._apply(tensors, *label, swap=swap, wait_load=True)
        except Exception as e:
            out = False, f"Failed to receive weights: {e}"
        finally:
            self._recv_lock.release()
        self._settle(out, done, early_session)

    def _loader(self, tensors: dict[str, torch.Tensor],
                weight_version: str | None, flush_cache: bool,
                swap: tuple[tuple, torch.Tensor] | None):
        """The load of one bucket on the scheduler thread. With ``swap=(layout, flat)`` the tensors
        are views of ``flat``, which the parameters may adopt instead of copying it."""
        def load_between_steps(sched) -> tuple[bool, str]:
            state = self._live_state(sched.model)
            refusal = self._deferred_error or self._refusal(state, tensors)
            if refusal:
                self._keep_spare(swap)
                return False, refusal
            if swap is None or not self._swap_in(sched.model, tensors, *swap):
                with torch.no_grad():
                    for name, t in tensors.items():
                        self._copy(state, name, t)
                self._keep_spare(swap)
            if weight_version is not None:
                sched.weight_version = weight_version
            if flush_cache and not sched.flush():
                return False, NOT_FLUSHED
            return True, "Succeeded to update parameter online."
        return load_between_steps

    def _keep_spare(self, swap: tuple[tuple, torch.Tensor] | None) -> None:
        """The received buffer was not adopted: keep it for the next sync of its layout."""
        if swap is not None:
            self._spare[swap[0]] = swap[1]

    def _apply(self, tensors: dict[str, torch.Tensor],
               weight_version: str | None, flush_cache: bool,
               swap: tuple[tuple, torch.Tensor] | None = None,
               wait_load: bool = False) -> tuple[bool, str] | Future:
        """Queue the load of ``tensors``: a bucket that neither sets the version nor flushes is
        checked, queued and answered at once (ENGINE.md); otherwise (or with ``wait_load``: the
        gloo path, which answers early only while paused) the answer is a Future of the load."""
        early = weight_version is None and not flush_cache and not wait_load
        if early:
            refusal = self._deferred_error or self._refusal(
                self._live_state(self.scheduler.model), tensors)
            if refusal:
                self._keep_spare(swap)
                return False, refusal
        done: Future = Future()  # early: done once its failure, if any, is noted (end() reads it)
        loading = self.scheduler.call(self._loader(tensors, weight_version, flush_cache, swap))
        self._settle(loading, done, self._session_id if early else None)
        if not early:
            return done
        self._early.append(done)
        return True, "Succeeded to update parameter online."

    def _settle(self, out: tuple[bool, str] | Future, done: Future,
                early_session: int | None) -> None:
        """Hand the answer ``out`` (or, once there, the answer of the Future ``out``) to ``done``;
        for a bucket answered early (``early_session``), a failure first fails the rest of its
        session (only that session: a stale failure must not spoil the next sync)."""
        if isinstance(out, Future):
            out.add_done_callback(lambda f: self._settle(
                f.result() if f.exception() is None else (False, repr(f.exception())), done,
                early_session))
            return
        if not out[0] and early_session is not None:
            log.warning("a weight bucket failed after it was answered: %s", out[1])
            if early_session == self._session_id and not self._deferred_error:
                self._deferred_error = f"an earlier bucket of this update failed: {out[1]}"
        try:
            done.set_result(out)
        except InvalidStateError:  # the HTTP caller hung up and cancelled its wait; the load stands
            pass

    def _live_state(self, model: torch.nn.Module) -> LiveState:
        """``model``'s state by name (``LiveState``), made once per model: a bucket's check and
        load read the tensors the names hold now without building the state dict again."""
        state = self._state
        if state is None or state.model is not model:
            state = self._state = LiveState(model)
        return state

    def _slices(self) -> dict[str, tuple[str, torch.Tensor]]:
        """The checkpoint's names the module holds under others (``checkpoint_slices``: a
        mixture's per-expert tensors), made once: where a push under those names lands."""
        if self._checkpoint_slices is None:
            from areal_like.weights.hf import checkpoint_slices

            self._checkpoint_slices = checkpoint_slices(self.scheduler.model)
        return self._checkpoint_slices

    def _refusal(self, state: Mapping[str, torch.Tensor], tensors: dict[str, torch.Tensor]
                 ) -> str:
        """Why ``tensors`` cannot be loaded into ``state`` ('' if they can): each is one of the
        module's own tensors or a checkpoint's name for a slice of one, of its shape."""
        for name, t in tensors.items():
            if name in state:
                shape = tuple(state[name].shape)
            elif name in self._slices():
                shape = tuple(self._slices()[name][1].shape)
            else:
                return f"Unknown parameter {name!r}; nothing was loaded."
            if shape != tuple(t.shape):
                return (f"Shape mismatch for {name}: engine {shape}, received {tuple(t.shape)}; "
                        "nothing was loaded.")
        return ""

    def _copy(self, state: Mapping[str, torch.Tensor], name: str, t: torch.Tensor) -> None:
        """Copy ``t`` into the module's tensor ``name``, or into the slice of a fused parameter a
        checkpoint's ``name`` is (its elements by their flat indices there)."""
        if name in state:
            state[name].copy_(t)
            return
        param, index = self._slices()[name]
        fused = state[param]
        fused.view(-1).index_copy_(0, index.view(-1).to(fused.device),
                                   t.reshape(-1).to(fused.device, fused.dtype))

    def _swap_in(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor], key: tuple,
                 flat: torch.Tensor) -> bool:
        """Scheduler thread: make the parameters views of ``flat`` when every name is a distinct
        parameter of the same dtype and device; the buffer they viewed (if any) becomes the
        spare."""
        chosen = [self._live_state(model).parameter(n) for n in tensors]
        if any(p is None for p in chosen) or len({id(p) for p in chosen}) != len(chosen):
            return False  # a buffer, a tied alias or a repeated name: copy instead
        if any(p.dtype != t.dtype or p.device != t.device
               for p, t in zip(chosen, tensors.values())):
            return False
        for p, t in zip(chosen, tensors.values()):
            p.data = t
        retired = self._live.get(key)
        self._live[key] = flat
        if retired is not None:
            self._spare[key] = retired
        return True


class LiveState(Mapping):
    """``model.state_dict()`` without building it: name -> the tensor (detached) its module holds
    under that name now. The names and their modules are found once; what a module holds is read
    at each lookup, so a parameter swapped in since (``WeightUpdater._swap_in``: ``p.data = t``)
    is seen as it is."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        names = set(model.state_dict())
        self._where: dict[str, tuple[torch.nn.Module, str]] = {}
        for prefix, module in model.named_modules(remove_duplicate=False):
            tensors = [*module.named_parameters(recurse=False, remove_duplicate=False),
                       *module.named_buffers(recurse=False, remove_duplicate=False)]
            for attr, _ in tensors:
                name = f"{prefix}.{attr}" if prefix else attr
                if name in names:
                    self._where[name] = (module, attr)
        # what named_parameters() names: a tied alias is not one (it is copied, not swapped in)
        self._params = {n for n, _ in model.named_parameters()}

    def __getitem__(self, name: str) -> torch.Tensor:
        module, attr = self._where[name]
        return getattr(module, attr).detach()

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def parameter(self, name: str) -> torch.nn.Parameter | None:
        """The parameter object ``name`` is (None for a buffer, a tied alias, or no such name)."""
        if name not in self._params:
            return None
        module, attr = self._where[name]
        return getattr(module, attr)


def _one_buffer(tensors: dict[str, torch.Tensor]) -> tuple[tuple, list, torch.Tensor] | None:
    """(layout key, layout, a uint8 view of the bytes) when ``tensors`` lie back to back in one
    storage in the wire layout (``weight_wire.layout``, what ``TensorSender`` sends); else None."""
    items = list(tensors.items())
    first = items[0][1]
    try:
        tensor_layout, nbytes = layout([n for n, _ in items], [str(t.dtype) for _, t in items],
                                       [list(t.shape) for _, t in items])
    except ValueError:
        return None
    storage = first.untyped_storage()
    base = first.storage_offset() * first.element_size()
    for (_, _, _, offset), (_, t) in zip(tensor_layout, items):
        if (t.untyped_storage().data_ptr() != storage.data_ptr() or not t.is_contiguous()
                or t.storage_offset() * t.element_size() != base + offset):
            return None
    if base + nbytes > storage.nbytes():
        return None
    flat = torch.empty(0, dtype=torch.uint8, device=first.device).set_(storage, base, (nbytes,))
    return tuple((n, str(dt), tuple(s)) for n, dt, s, _ in tensor_layout), tensor_layout, flat


class _TensorUnpickler(pickle.Unpickler):
    """Resolves the names of ``_ALLOWED`` and torch's dtypes; refuses every other global."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and name.isidentifier() and isinstance(
                getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weight payload")


def decode_named_tensors(payload: str | bytes) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of one payload, in its order. Raises ValueError saying what is wrong."""
    import torch.multiprocessing  # noqa: F401 (registers torch's rebuild functions)

    try:
        data = base64.b64decode(payload, validate=True) if isinstance(payload, str) else payload
        named = _TensorUnpickler(io.BytesIO(data)).load()
    except (binascii.Error, pickle.UnpicklingError, EOFError, RuntimeError, OSError) as e:
        raise ValueError("cannot decode serialized_named_tensors: "
                         f"{type(e).__name__}: {e}") from None
    if not isinstance(named, list) or not all(
            isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)
            and isinstance(x[1], torch.Tensor)
            for x in named):
        raise ValueError("serialized_named_tensors must hold a list of (name, tensor) pairs")
    out = dict(named)
    if len(out) != len(named):
        raise ValueError("serialized_named_tensors names a tensor twice")
    return out
