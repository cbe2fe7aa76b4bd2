"""Loss kernels and token log-probs on CUDA: same numbers as on CPU, bounded memory for a real
vocab.

Marked ``gpu`` and skipped without CUDA by tests/gpu/conftest.py.
"""

from __future__ import annotations

import pytest
import torch

from areal_like.settings.config import LOSS_KINDS, LossConfig
from areal_like.settings.loss_schema import MISConfig
from trainer.logprobs import CHUNK_BYTES, token_logprobs
from trainer.losses import compute_policy_loss


def _batch(device):
    g = torch.Generator().manual_seed(0)
    b, t = 6, 9
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    prox = torch.log(torch.rand(b, t, generator=g) * 0.9 + 0.05)
    logp = prox + 0.3 * torch.randn(b, t, generator=g)
    behav = prox + 0.3 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, generator=g)[:, None] * mask
    return {k: v.to(device)
            for k, v in dict(logp=logp, prox=prox, behav=behav, adv=adv, mask=mask).items()}


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_cuda_matches_cpu(kind):
    results = []
    for device in ("cpu", "cuda"):
        b = _batch(device)
        lp = b["logp"].clone().requires_grad_(True)
        cfg = LossConfig(kernel=kind, agg="seq-mean-token-mean", dual_clip=3.0,
                         mis=MISConfig(high=5.0))
        loss, stats = compute_policy_loss(cfg, logp=lp, prox_logp=b["prox"], behav_logp=b["behav"],
                                          advantages=b["adv"], mask=b["mask"])
        loss.backward()
        assert all(v.device.type == device for v in stats.values())
        results.append((loss.detach().cpu(), lp.grad.cpu(), {k: v.cpu() for k, v in stats.items()}))
    (l_cpu, g_cpu, s_cpu), (l_gpu, g_gpu, s_gpu) = results
    torch.testing.assert_close(l_gpu, l_cpu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_gpu, g_cpu, rtol=1e-5, atol=1e-7)
    for k in s_cpu:
        torch.testing.assert_close(s_gpu[k], s_cpu[k], rtol=1e-5, atol=1e-6)


def test_token_logprobs_bf16_real_vocab_memory_bounded():
    torch.manual_seed(0)
    vocab, b, t = 151_936, 4, 512
    logits = (torch.randn(b, t, vocab, device="cuda") * 3).bfloat16().requires_grad_(True)
    tokens = torch.randint(0, vocab, (b, t), device="cuda")
    logits_bytes = logits.numel() * logits.element_size()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = token_logprobs(logits, tokens, 0.9)
    out.sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    # the bf16 gradient (at most twice if autograd copies it) plus a few fp32 chunks; the plain
    # fp32 log_softmax path needs about 7x logits_bytes (fp32 copy, output, fp32 grads)
    assert peak < 2 * logits_bytes + 6 * CHUNK_BYTES, (peak, logits_bytes)
    rows = slice(0, 8)
    ref = (torch.log_softmax(logits.detach()[0, rows].double() / 0.9, -1)
           .gather(-1, tokens[0, rows, None]).squeeze(-1))
    torch.testing.assert_close(out.detach()[0, rows].double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(logits.grad.float()).all()
