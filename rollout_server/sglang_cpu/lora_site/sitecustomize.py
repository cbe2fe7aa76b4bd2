"""The ``sitecustomize`` of an SGLang process on CPU with LoRA (this directory is on its
``PYTHONPATH`` only then: rollout_server/launch_sglang.py): ``unpin()`` under ``UNPINNED_ENV``
(rollout_server/sglang_cpu/lora_site/__init__.py says why), then the ``sitecustomize`` Python
would have run without this directory (a virtual environment's, a cluster's, coverage's): the
first one on ``sys.path`` outside it, run as Python would have, also when ``unpin`` failed.
"""

import importlib.machinery
import importlib.util
import os
import sys


def _chain() -> None:
    here = os.path.dirname(os.path.realpath(__file__))
    rest = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


try:
    from rollout_server.sglang_cpu.lora_site import UNPINNED_ENV, unpin

    if os.environ.get(UNPINNED_ENV) == "1":
        unpin()
finally:
    _chain()
