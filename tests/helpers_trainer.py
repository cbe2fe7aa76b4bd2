"""Trainer helpers for tests (no production path needs them)."""

from __future__ import annotations

import threading

import torch

from trainer.ranks import full


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a full CPU tensor, on every rank (a collective: all ranks must call
    it)."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = full(p).detach().to("cpu", torch.float32).clone()
    return out


class BufferStandIn:
    """A ROUTER on ``address`` in place of the buffer: each request gets ``answer(message)``, on
    its own thread until ``close()``. Subclasses set their state before calling this
    ``__init__`` (the thread may answer at once)."""

    def __init__(self, address: str):
        from areal_like.net.transport import Server

        self.server, self.stop = Server(address), threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def answer(self, m):
        raise NotImplementedError

    def _serve(self) -> None:
        while not self.stop.is_set():
            got = self.server.recv(0.1)
            if got is not None:
                peer, req_id, m = got
                self.server.send(peer, req_id, self.answer(m))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.server.close()
