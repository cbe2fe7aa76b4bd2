"""trainer/model.py's kernel choices checked on CPU against the eager/multi-tensor runs: fused
AdamW on CUDA, and trainer.compile_blocks' torch.compile of decoder blocks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from areal_like.settings.config import ConfigError, load_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_packed_attention import SHAPES, packed_batch, packed_model  # noqa: E402


def test_adamw_is_fused_on_cuda_and_computes_what_foreach_does():
    """Three fused steps (CPU has the kernel too) equal the multi-tensor ones."""
    from trainer.model import adamw_options

    assert adamw_options(torch.device("cuda", 0)) == {"fused": True}
    assert adamw_options(torch.device("cpu")) == {"foreach": True}
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(7)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    out = {}
    for name, opts in (("fused", adamw_options(torch.device("cuda"))),
                       ("foreach", adamw_options(torch.device("cpu")))):
        params = [p.clone().requires_grad_() for p in start]
        opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, **opts)
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()
        assert opt.param_groups[0][name] is True
        out[name] = [p.detach() for p in params]
    for a, b in zip(out["fused"], out["foreach"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert not torch.equal(a, b.new_zeros(b.shape))


def test_compiled_blocks_compute_what_eager_blocks_do():
    """Dynamo's eager backend: the tracing of packed kwargs, checkpointing and names is checked,
    not inductor's code."""
    from trainer.model import checkpoint_blocks, compile_blocks
    from trainer.step import output_logp

    model, batch = packed_model(), packed_batch(SHAPES)
    names = [n for n, _ in model.named_parameters()]

    def run(packed):
        model.zero_grad()
        lp = output_logp(model, batch, 0.8, chunk_tokens=5, packed=packed)
        (lp * batch.mask).sum().backward()
        return lp.detach(), [p.grad.clone() for p in model.parameters()]

    eager = {packed: run(packed) for packed in (True, False)}
    checkpoint_blocks(model)
    compile_blocks(model, backend="eager")
    assert [n for n, _ in model.named_parameters()] == names
    assert all(b._compiled_call_impl is not None for b in model.model.layers)
    try:
        for packed in (True, False):
            lp, grads = run(packed)
            torch.testing.assert_close(lp, eager[packed][0], rtol=0, atol=1e-6)
            for a, b in zip(grads, eager[packed][1]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()


def test_compile_blocks_is_off_by_default_and_reaches_the_build():
    from trainer.model import init_distributed, leave_distributed, shard_model

    assert load_config([]).trainer.compile_blocks is False
    with pytest.raises(ConfigError):
        load_config(["trainer.compile_blocks=maybe"])
    cfg = load_config(["trainer.compile_blocks=true"])
    init_distributed(cfg.trainer)
    try:
        for flag in (False, True):
            trainer = cfg.trainer if flag else load_config([]).trainer
            model = shard_model(cfg.model, trainer)
            # compiled lazily, at the first call: nothing is compiled here
            assert all((b._compiled_call_impl is not None) == flag for b in model.model.layers)
    finally:
        leave_distributed()
