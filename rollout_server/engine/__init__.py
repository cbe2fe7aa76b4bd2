"""rollout_server/engine: the embedded engine, an HTTP server speaking SGLang 0.5.23's protocol subset.

Modules: ``scheduler`` (continuous batching over a slot KV cache), ``kv`` (the cache), ``sampling``
(sampler and the logprob convention), ``api`` (``/generate`` validation and response shapes),
``http_server`` (routes, pause/weight-update gate), ``weights`` (weight-update receive side),
``metrics`` (SGLang-named Prometheus series), ``embedded`` (``EmbeddedEngine`` wiring them up).
Imports are lazy so ``import rollout_server.engine`` stays cheap.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name == "EmbeddedEngine":
        from rollout_server.engine.embedded import EmbeddedEngine

        return EmbeddedEngine
    raise AttributeError(name)


__all__ = ["EmbeddedEngine"]
