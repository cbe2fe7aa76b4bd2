"""The log-prob head switch (trainer.logprob_head, trainer/logprobs.py): ``auto`` falls back to the
chunked head without CUDA or liger-kernel, ``fused`` is refused where it cannot run, and the
head the CPU takes gives the hand-computed log-prob and gradients. The fused head against the
chunked one is tests/gpu/test_logprob_head_cuda.py's (liger-kernel is Triton, CUDA only)."""

from __future__ import annotations

import math

import pytest
import torch

from areal_like.settings.config import load_config
from trainer.logprobs import fused_head_available, hidden_token_logprobs, resolve_head
from trainer.step import StepSettings


def test_auto_falls_back_to_the_chunked_head_on_cpu():
    assert not fused_head_available("cpu")
    assert resolve_head("auto", "cpu") == "chunked"
    assert resolve_head("chunked", "cpu") == "chunked"
    with pytest.raises(ValueError, match="fused log-prob head needs CUDA"):
        resolve_head("fused", "cpu")
    with pytest.raises(ValueError, match="unknown log-prob head 'bogus'"):
        resolve_head("bogus", "cpu")


@pytest.mark.parametrize("head", ["auto", "chunked"])
def test_the_cpu_head_gives_the_hand_computed_logprob_and_gradients(head):
    # logits [1, 0, 0] / T for the one row: log pi(token 0) = 1/T - log(e^(1/T) + 2)
    for t in (1.0, 0.5):
        h = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
        w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64,
                         requires_grad=True)
        lp = hidden_token_logprobs(h, w, torch.tensor([0]), t, chunk_tokens=1, head=head)
        z = math.exp(1 / t) + 2
        assert lp.item() == pytest.approx(1 / t - math.log(z), abs=1e-12)
        (3.0 * lp).sum().backward()  # a per-token upstream gradient of 3
        # d lp / d logits = (onehot - softmax) / T; h gets it through W, W through h
        g = [3 * (1 - math.exp(1 / t) / z) / t, -3 / z / t, -3 / z / t]
        assert h.grad.flatten().tolist() == pytest.approx([g[0], g[1]], abs=1e-12)
        assert w.grad.flatten().tolist() == pytest.approx([g[0], 0.0, g[1], 0.0, g[2], 0.0],
                                                          abs=1e-12)


def test_the_config_key_reaches_the_step_settings():
    assert StepSettings.from_config(load_config([])).head == "auto"
    assert StepSettings.from_config(load_config(["trainer.logprob_head=chunked"])).head == "chunked"
    with pytest.raises(Exception, match="logprob_head"):
        load_config(["trainer.logprob_head=bogus"])
