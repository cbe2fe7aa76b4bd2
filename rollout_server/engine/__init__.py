"""rollout_server/engine: the embedded engine, an HTTP server speaking SGLang 0.5.23's protocol
subset (ENGINE.md). Imports are lazy so ``import rollout_server.engine`` stays cheap.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name == "EmbeddedEngine":
        from rollout_server.engine.embedded import EmbeddedEngine

        return EmbeddedEngine
    raise AttributeError(name)


__all__ = ["EmbeddedEngine"]
