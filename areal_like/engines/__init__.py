"""Inference engine clients: the interface the rest of the system calls (``client.py``,
``EngineClient``) and its implementations, SGLang's (``sglang.py``, which also drives the embedded
engine) and vLLM's (``vllm.py``). ``engine_client`` picks one by ``rollout.engine.kind``.
Invariant: a wing above ``net``: it imports ``net`` and ``wire`` only.
"""

from areal_like.engines.client import EngineClient
from areal_like.engines.sglang import SGLangClient
from areal_like.engines.vllm import VLLMClient


def engine_client(kind: str, base_url: str, **kwargs) -> EngineClient:
    """The client for an engine of ``rollout.engine.kind`` (the embedded engine and one attached
    by URL speak SGLang's protocol)."""
    return (VLLMClient if kind == "vllm" else SGLangClient)(base_url, **kwargs)
