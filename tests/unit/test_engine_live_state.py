"""``rollout_server.engine.weights.LiveState``: the engine's state by name without building the
state dict per bucket; equal to ``state_dict()``, and it sees a parameter swapped in since."""

from __future__ import annotations

import torch

from rollout_server.engine.weights import LiveState


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.block = torch.nn.Linear(3, 3)
        self.norm = torch.nn.BatchNorm1d(3)  # buffers: running_mean, num_batches_tracked, ...
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("scratch", torch.zeros(2), persistent=False)  # not in state_dict


def test_it_equals_the_state_dict_and_sees_a_swapped_parameter():
    model = Tied()
    state, live = model.state_dict(), LiveState(model)
    assert list(live) == list(state) and len(live) == len(state)
    assert "scratch" not in live and "head.weight" in live
    for name, t in state.items():
        assert torch.equal(live[name], t) and live[name].data_ptr() == t.data_ptr()
        assert not live[name].requires_grad
    new = torch.full((3, 3), 7.0)
    model.block.weight.data = new  # what the engine's swap-in does
    assert live["block.weight"].data_ptr() == new.data_ptr()
    assert live.parameter("block.weight") is model.block.weight
    assert live.parameter("embed.weight") is model.embed.weight
    assert live.parameter("head.weight") is None  # the tied alias: copied, not swapped in
    assert live.parameter("norm.running_mean") is None and live.parameter("nope") is None
