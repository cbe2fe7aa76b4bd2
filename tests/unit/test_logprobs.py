"""token_logprobs: reference equivalence, chunking, fp32 upcast, gradients."""

from __future__ import annotations

import pytest
import torch

from trainer.logprobs import token_logprobs


def reference(logits, tokens, temperature):
    x = logits.double() / temperature
    return torch.log_softmax(x, -1).gather(-1, tokens[..., None]).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("chunk_bytes", [4 * 11, 4 * 11 * 5, 2**30])  # 1 row, 5 rows, everything
def test_matches_reference_and_gradient(temperature, chunk_bytes):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 4, 11, generator=g) * 4).requires_grad_(True)
    tokens = torch.randint(0, 11, (3, 4), generator=g)
    weights = torch.randn(3, 4, generator=g)
    out = token_logprobs(logits, tokens, temperature, chunk_bytes=chunk_bytes)
    assert out.dtype == torch.float32 and out.shape == (3, 4)
    torch.testing.assert_close(out.double(), reference(logits.detach(), tokens, temperature),
                               rtol=1e-5, atol=1e-5)
    (out * weights).sum().backward()
    ref_logits = logits.detach().clone().requires_grad_(True)
    (reference(ref_logits, tokens, temperature) * weights).sum().backward()
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad.double(), rtol=1e-5, atol=1e-6)


def test_gradcheck_float64():
    logits = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 7, (2, 3))
    assert torch.autograd.gradcheck(
        lambda z: token_logprobs(z, tokens, 0.8, chunk_bytes=8 * 7 * 2), (logits,))


def test_bf16_logits_are_upcast_to_fp32():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 8, 50, generator=g) * 5).bfloat16().requires_grad_(True)
    tokens = torch.randint(0, 50, (2, 8), generator=g)
    out = token_logprobs(logits, tokens, 1.0)
    assert out.dtype == torch.float32
    exact = reference(logits.detach(), tokens, 1.0)  # fp64 math on the same bf16 inputs
    assert (out.double() - exact).abs().max() < 1e-5
    bf16_math = (torch.log_softmax(logits.detach(), -1).gather(-1, tokens[..., None])
                 .squeeze(-1).double())
    assert (bf16_math - exact).abs().max() > 1e-3  # what the upcast avoids
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


def test_extreme_logits_are_finite():
    logits = torch.tensor([[[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]]], requires_grad=True)
    tokens = torch.tensor([[1, 2]])
    out = token_logprobs(logits, tokens, 0.5)
    # fp32 spacing at 2e4 is 2e-3: the logsumexp of three equal -2e4 logits is exact only to that
    torch.testing.assert_close(out, torch.tensor([[-4e4, -torch.log(torch.tensor(3.0))]]),
                               rtol=0, atol=4e-3)
    out.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_shape_and_temperature_errors():
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="do not match"):
        token_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long), 1.0)
