"""A pure-torch stand-in for ``sgl_kernel``: SGLang's CPU mode without sgl_kernel's CPU build.

SGLang 0.5.23 in CPU mode (``SGLANG_USE_CPU_ENGINE=1``) imports a few CPU helpers from
``sgl_kernel`` when its modules load; the registry's ``sgl_kernel`` is the CUDA build and does not
import without ``libcuda``. This package provides exactly the helpers that release imports on the
``--attention-backend torch_native`` CPU path (``ops.py``, each with the semantics of SGLang's
own reference for it) and raises a clear error for any other name: a silent mock would skip
work SGLang relies on.

It is put first on the ``PYTHONPATH`` of the SGLang process only
(``rollout_server/launch_sglang.py``, CPU mode), never of this project's own processes.
Checked against ``SGLANG_VERSION``; importing it under another SGLang release fails, because
that release may import or expect other helpers.
"""

from __future__ import annotations

from importlib import metadata

# this project's own install: SGLang runs on its Python (rollout_server/launch_sglang.py)
from rollout_server.sglang_cpu import SGLANG_VERSION, check_sglang_version

from .ops import assign_req_to_token_pool_cpu, copy_all_layer_kv_cache_cpu

__all__ = ["assign_req_to_token_pool_cpu", "copy_all_layer_kv_cache_cpu"]

# Imported by SGLang's speculative-decoding modules whenever they load (``sglang/kernels/ops/
# speculative/{spec_tree,eagle,cache_locs,multi_layer_eagle}.py``), which the server always does,
# but called only with speculative decoding on: present so the import works, refusing when called.
SPECULATIVE = (
    "build_tree_kernel_efficient_cpu",
    "verify_tree_greedy_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "rotate_input_ids_cpu",
)


def _refusing(name: str):
    def refuse(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name}: the CPU stand-in (areal-like, rollout_server/sglang_cpu) "
            "does not run speculative decoding; start SGLang without --speculative-*"
        )

    refuse.__name__ = name
    return refuse


globals().update({name: _refusing(name) for name in SPECULATIVE})


def _check_release() -> None:
    try:
        found = metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return  # imported outside SGLang (this project's unit tests): nothing to check
    check_sglang_version(found)


_check_release()


def __getattr__(name: str):
    if name.startswith("__"):  # import machinery probes (__path__, __file__ ...): the usual answer
        raise AttributeError(name)
    raise ImportError(
        f"sgl_kernel.{name} is not provided by the CPU stand-in (areal-like, "
        f"rollout_server/sglang_cpu, "
        f"checked against sglang=={SGLANG_VERSION}): it implements only {', '.join(__all__)}, "
        f"what that release calls on the torch_native CPU path"
    )
