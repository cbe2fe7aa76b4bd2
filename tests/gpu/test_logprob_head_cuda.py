"""The fused log-prob head (liger-kernel's fused linear cross entropy, reduction none) against the
chunked one on CUDA (trainer/logprobs.py): values and gradients under a per-token upstream
gradient, fp32 and bf16, temperature 1 and 0.7, at Qwen2.5-0.5B's vocabulary and hidden size.
``auto`` takes the fused head here. Figures: each head's forward + backward seconds and peak
memory over 8,192 tokens in bf16 (``logprob_head_fused_s`` beside ``..._baseline_chunked``)."""

from __future__ import annotations

import time

import pytest
import torch

from trainer.logprobs import fused_head_available, hidden_token_logprobs, resolve_head

VOCAB, HIDDEN = 151936, 896


def _fused_or_skip():
    if not fused_head_available("cuda"):
        pytest.skip("liger-kernel (with Triton) is not installed or does not import")


def run(head: str, h0, w0, tok, up, temperature: float):
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    lp = hidden_token_logprobs(h, w, tok, temperature, head=head)
    (lp * up).sum().backward()
    return lp.detach(), h.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_equals_chunked_on_cuda(dtype, temperature):
    _fused_or_skip()
    assert resolve_head("auto", "cuda") == "fused"
    g = torch.Generator(device="cuda").manual_seed(0)
    n = 1000
    h0 = torch.randn(n, HIDDEN, device="cuda", generator=g).to(dtype)
    w0 = (0.02 * torch.randn(VOCAB, HIDDEN, device="cuda", generator=g)).to(dtype)
    tok = torch.randint(0, VOCAB, (n,), device="cuda", generator=g)
    up = torch.rand(n, device="cuda", generator=g)  # each token its own upstream gradient
    fused, chunked = (run(head, h0, w0, tok, up, temperature) for head in ("fused", "chunked"))
    assert fused[0].dtype == torch.float32 and fused[1].dtype == dtype
    # fp32: matmul rounding (TF32 off by default); bf16: the logits' rounding, and h / T
    # rounded to bf16 before the product in the fused head
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(fused[0], chunked[0], atol=tol, rtol=0), (
        (fused[0] - chunked[0]).abs().max().item())
    for a, b in zip(fused[1:], chunked[1:]):
        scale = b.float().abs().max().item()
        err = (a.float() - b.float()).abs().max().item()
        assert err <= (1e-4 if dtype == torch.float32 else 2e-2) * scale, (err, scale)


def test_fused_head_time_and_memory(figure):
    _fused_or_skip()
    g = torch.Generator(device="cuda").manual_seed(1)
    n = 8192
    h0 = torch.randn(n, HIDDEN, device="cuda", generator=g).bfloat16()
    w0 = (0.02 * torch.randn(VOCAB, HIDDEN, device="cuda", generator=g)).bfloat16()
    tok = torch.randint(0, VOCAB, (n,), device="cuda", generator=g)
    up = torch.rand(n, device="cuda", generator=g)
    got = {}
    for head in ("fused", "chunked"):
        run(head, h0, w0, tok, up, 1.0)  # warm-up (Triton compiles)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        for _ in range(3):
            run(head, h0, w0, tok, up, 1.0)
        torch.cuda.synchronize()
        got[head] = ((time.perf_counter() - t0) / 3,
                     (torch.cuda.max_memory_allocated() - base) / 2**20)
    figure("logprob_head_fused_s", got["fused"][0], "s")
    figure("logprob_head_fused_s_baseline_chunked", got["chunked"][0], "s")
    figure("logprob_head_fused_ratio", got["chunked"][0] / got["fused"][0], "x")
    figure("logprob_head_fused_peak_mib", got["fused"][1], "MiB")
    figure("logprob_head_fused_peak_mib_baseline_chunked", got["chunked"][1], "MiB")
