"""hidden_token_logprobs: lm_head a chunk of tokens at a time, forward and backward, against the
unchunked ``token_logprobs(hidden @ W.T)``; its peak memory holds one chunk of logits. The
hand-computed log-prob and gradients: test_logprob_head.py."""

from __future__ import annotations

import pytest
import torch

from benchmarks.memory import PeakTensorBytes
from trainer.logprobs import hidden_token_logprobs, token_logprobs


def _case(n=7, h=5, v=11, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype)
    weight = torch.randn(v, h, generator=g, dtype=dtype)
    tokens = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, tokens, torch.randn(n, generator=g, dtype=dtype)


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_values_and_gradients_equal_the_unchunked_computation(chunk, temperature):
    hidden, weight, tokens, w_out = _case()
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = hidden_token_logprobs(h1.view(1, 7, 5), w1, tokens.view(1, 7), temperature,
                                chunk_tokens=chunk)
    assert out.shape == (1, 7) and out.dtype == torch.float32
    (out.view(-1) * w_out).sum().backward()
    h2, w2 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref = token_logprobs(h2 @ w2.t(), tokens, temperature)
    (ref * w_out.double()).sum().backward()
    torch.testing.assert_close(out.view(-1).double(), ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h1.grad.double(), h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad.double(), w2.grad, rtol=1e-5, atol=1e-6)


def test_gradcheck_float64():
    hidden, weight, tokens, _ = _case(n=5, h=3, v=6, dtype=torch.float64)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: hidden_token_logprobs(a, b, tokens, 0.8, chunk_tokens=2),
        (hidden, weight))


def test_bf16_compute_gives_fp32_logprobs_and_bf16_gradients():
    hidden, weight, tokens, _ = _case(n=16, h=8, v=50, seed=3)
    hb, wb = hidden.bfloat16().requires_grad_(True), weight.bfloat16().requires_grad_(True)
    out = hidden_token_logprobs(hb, wb, tokens, 1.0, chunk_tokens=4)
    assert out.dtype == torch.float32
    # the same numbers as the bf16 logits the unchunked path would see, upcast before the softmax
    ref = token_logprobs((hb.detach() @ wb.detach().t()), tokens, 1.0)
    torch.testing.assert_close(out.detach(), ref, rtol=0, atol=1e-5)
    out.sum().backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16


def _peak(n: int, chunk: int | None, h: int = 16, v: int = 8192) -> int:
    hidden, weight, tokens, _ = _case(n=n, h=h, v=v, seed=1)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    with PeakTensorBytes() as m:
        if chunk is None:
            out = token_logprobs(hidden @ weight.t(), tokens, 1.0)
        else:
            out = hidden_token_logprobs(hidden, weight, tokens, 1.0, chunk_tokens=chunk)
        out.sum().backward()
    return m.peak


def test_peak_memory_holds_one_chunk_of_logits_not_all_of_them():
    v, h, chunk = 8192, 16, 32
    block = chunk * v * 4  # one [chunk, V] fp32 block: 1 MiB
    small, large = _peak(256, chunk), _peak(2048, chunk)
    # 1792 more tokens add 56 MiB of logits to the unchunked path but only [n, H]-sized tensors here
    assert large - small < 1792 * h * 4 * 4
    weight_sized = v * h * 4  # the weight gradient (and its fp32 accumulator)
    assert large < 2 * block + 3 * weight_sized + 2048 * h * 4 * 4
    unchunked = _peak(2048, None)
    assert unchunked >= 2048 * v * 4  # the full logits
    assert large * 8 < unchunked


def test_bad_arguments_are_named():
    hidden, weight, tokens, _ = _case()
    with pytest.raises(ValueError, match="temperature"):
        hidden_token_logprobs(hidden, weight, tokens, 0.0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        hidden_token_logprobs(hidden, weight, tokens, 1.0, chunk_tokens=0)
    with pytest.raises(ValueError, match="do not match"):
        hidden_token_logprobs(hidden, weight[:, :3], tokens, 1.0)
