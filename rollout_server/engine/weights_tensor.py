"""Decoding SGLang's ``/update_weights_from_tensor`` payload (ENGINE.md, "Weight updates, receive
side"). Unpickling goes through ``_TensorUnpickler``, which resolves only the torch rebuild
functions and types such a payload names; anything else is refused with the name it asked for."""

from __future__ import annotations

import base64
import binascii
import io
import pickle
from concurrent.futures import Future

import torch

LOAD_FORMATS = (None, "auto")  # a list of (name, tensor); SGLang's "flattened_bucket" needs its own classes
_MODULES = ("torch", "torch.storage", "torch._utils", "torch.multiprocessing.reductions")
_BUILTINS = ("list", "tuple", "dict", "int", "float", "bool", "str", "slice", "getattr", "bytearray", "complex")


class _TensorUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in _MODULES or (module == "builtins" and name in _BUILTINS):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weight payload")


def decode_named_tensors(payload: str | bytes) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of one payload, in its order. Raises ValueError saying what is wrong."""
    import torch.multiprocessing  # noqa: F401 (registers torch's rebuild functions)

    try:
        data = base64.b64decode(payload, validate=True) if isinstance(payload, str) else payload
        named = _TensorUnpickler(io.BytesIO(data)).load()
    except (binascii.Error, pickle.UnpicklingError, EOFError, RuntimeError, OSError) as e:
        raise ValueError(f"cannot decode serialized_named_tensors: {type(e).__name__}: {e}") from None
    if not isinstance(named, list) or not all(
            isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) and isinstance(x[1], torch.Tensor)
            for x in named):
        raise ValueError("serialized_named_tensors must hold a list of (name, tensor) pairs")
    out = dict(named)
    if len(out) != len(named):
        raise ValueError("serialized_named_tensors names a tensor twice")
    return out


def update_from_tensor(updater, payloads: list, load_format: str | None, weight_version: str | None,
                       flush_cache: bool) -> tuple[bool, str] | Future:
    """``/update_weights_from_tensor`` (blocking): decode, then load like a bucket."""
    if load_format not in LOAD_FORMATS:
        return False, f"load_format={load_format!r} is not supported by the embedded engine (use null)"
    if not payloads:
        return False, "serialized_named_tensors is empty"
    try:
        tensors = decode_named_tensors(payloads[0])
    except ValueError as e:
        return False, f"Failed to update weights from tensor: {e}"
    return updater.load(tensors, weight_version, flush_cache)
