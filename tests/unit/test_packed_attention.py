"""Packed attention on CPU: host syncs per micro-batch, the varlen call, flash-attn detection."""

from __future__ import annotations

import contextlib
import importlib
import sys
import types

import numpy as np
import pytest
import torch

from areal_like.settings.config import load_config
from areal_like.wire.protocol import TrajectoryGroup
from areal_like.wire.trajectory import Trajectory
from trainer.data import groups_to_batch
from trainer.step import output_logp

SHAPES = [(3, 6), (5, 2), (2, 7), (4, 5)]  # two sequences of 9 tokens: a length group of 2


def packed_batch(shapes):
    rng = np.random.default_rng(0)
    trajs = [Trajectory.of(prompt_ids=rng.integers(4, 100, p), output_ids=rng.integers(4, 100, o),
                           behav_logp=np.full(o, -1.0), versions=np.zeros(o, np.int32), reward=1.0,
                           finish_reason="stop") for p, o in shapes]
    return groups_to_batch([TrajectoryGroup(group_id="g", server_id="s", lease_id="0",
                                            prompt_index=0, epoch=0, trajectories=trajs)])


def packed_model():
    from areal_like.weights.hf import build_model
    from trainer.model import attach_logprobs
    from trainer.packed_attention import PACKED_SDPA

    torch.manual_seed(0)
    model = attach_logprobs(build_model(load_config([]).model))
    model.set_attn_implementation(PACKED_SDPA)  # what trainer/model.py's shard_model does
    return model


@contextlib.contextmanager
def counting_host_syncs():
    """Count calls by which a tensor's value reaches the host (item, tolist, .to('cpu'), ...)."""
    calls: list[str] = []
    saved = {}

    def wrap(name, pred=lambda *a, **k: True):
        orig = getattr(torch.Tensor, name)
        saved[name] = orig

        def counted(self, *args, **kwargs):
            if pred(self, *args, **kwargs):
                calls.append(name)
            return orig(self, *args, **kwargs)
        setattr(torch.Tensor, name, counted)

    def to_host(self, *args, **kwargs):
        if kwargs.get("non_blocking") or (len(args) > 1 and args[1] is True):
            return False
        target = kwargs.get("device", args[0] if args else None)
        return isinstance(target, str) and torch.device(target).type == "cpu"

    for name in ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__",
                 "__index__"):
        wrap(name)
    wrap("to", to_host)
    try:
        yield calls
    finally:
        for name, orig in saved.items():
            setattr(torch.Tensor, name, orig)


def test_a_packed_forward_and_backward_sync_with_the_host_once():
    """Packed forward+backward read the lengths once; padded, never."""
    model, batch = packed_model(), packed_batch(SHAPES)
    model.config.use_cache = False  # as trainer/model.py's shard_model builds it
    assert model.config.num_hidden_layers >= 2
    with counting_host_syncs() as calls:
        lp = output_logp(model, batch, 0.8, chunk_tokens=5, packed=True)
        (lp * batch.mask).sum().backward()
    assert len(calls) <= 1, calls
    # right-padded, none: transformers' search of the positions for packed rows is skipped (seen:
    # one ``bool`` per forward before)
    with counting_host_syncs() as calls:
        lp = output_logp(model, batch, 0.8, chunk_tokens=5)
        (lp * batch.mask).sum().backward()
    assert calls == []


def logp_and_grads(model, batch, forward=None):
    """Log-probs (packed, by default) and every parameter's gradient of their masked sum."""
    model.zero_grad()
    lp = (forward or (lambda: output_logp(model, batch, 0.8, chunk_tokens=5, packed=True)))()
    (lp * batch.mask).sum().backward()
    return lp.detach(), [p.grad.clone() for p in model.parameters()]


def _reference_varlen(calls):
    """torch's varlen_attn signature computed per sequence with SDPA; records its calls."""
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                    window_size=(-1, -1), enable_gqa=False, **kwargs):
        calls.append({"max_q": max_q, "window_size": window_size, "gqa": enable_gqa,
                      "cu": cu_seq_q, "shape": tuple(query.shape), **kwargs})
        assert cu_seq_k is cu_seq_q and cu_seq_q.dtype == torch.int32
        bounds = cu_seq_q.tolist()
        assert max_q == max_k == max(b - a for a, b in zip(bounds, bounds[1:]))
        left, right = window_size
        assert right == 0  # causal

        def band(n):  # token i sees j in [i - left, i] (left -1: all before it)
            i, j = torch.arange(n)[:, None], torch.arange(n)[None]
            return (j <= i) & ((i - j <= left) if left >= 0 else True)
        outs = [torch.nn.functional.scaled_dot_product_attention(
            *(t[a:b].transpose(0, 1) for t in (query, key, value)), scale=scale,
            attn_mask=band(b - a), enable_gqa=enable_gqa).transpose(0, 1)
            for a, b in zip(bounds, bounds[1:])]
        return torch.cat(outs)
    return varlen_attn


@pytest.fixture
def varlen_standin(monkeypatch):
    """Make the packed path take the varlen kernel (the SDPA stand-in); returns its calls."""
    import trainer.packed_attention as pa

    def choose() -> list[dict]:
        calls: list[dict] = []
        monkeypatch.setattr(pa, "varlen_attn", _reference_varlen(calls))
        monkeypatch.setattr(pa, "uses_varlen_kernel", lambda q: True)
        return calls
    return choose


def test_the_varlen_kernel_gets_the_row_in_its_layout(varlen_standin):
    """Through the varlen kernel, log-probs and grads equal SDPA's ([T, H, D], cu_seqlens, GQA)."""
    model, batch = packed_model(), packed_batch(SHAPES)
    exact, g_exact = logp_and_grads(model, batch)
    calls = varlen_standin()
    varlen, g_varlen = logp_and_grads(model, batch)
    assert len(calls) == model.config.num_hidden_layers  # one launch per layer
    lens = [p + o for p, o in SHAPES]
    cfg = model.config
    assert calls[0]["max_q"] == max(lens) and calls[0]["cu"].tolist() == [0, 9, 16, 25, 34]
    assert calls[0]["shape"] == (sum(lens), cfg.num_attention_heads, cfg.hidden_size
                                 // cfg.num_attention_heads)
    assert calls[0]["gqa"] == (cfg.num_key_value_heads != cfg.num_attention_heads)
    assert calls[0]["window_size"] == (-1, 0)  # causal
    m = batch.mask > 0
    torch.testing.assert_close(varlen[m], exact[m], rtol=0, atol=1e-5)
    for a, b in zip(g_varlen, g_exact):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # fp32 sums in another order


@pytest.mark.parametrize("attn", ["sdpa", "sdpa_packed", "sliding_window"])
def test_packed_logp_and_grads_equal_each_sequence_alone(attn, varlen_standin):
    """Packed rows attend within their own sequence only, sliding windows too (on the SDPA path
    and the varlen kernel's), whatever the model's attention implementation."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from areal_like.weights.hf import build_model
    from trainer.model import attach_logprobs
    from trainer.packed_attention import PACKED_SDPA

    torch.manual_seed(0)
    if attn == "sliding_window":
        model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
            sliding_window=3, max_window_layers=0)).eval()
        assert set(model.config.layer_types) == {"sliding_attention"}
    else:
        model = build_model(load_config([]).model)
    model = attach_logprobs(model)
    if attn != "sdpa":  # what trainer/model.py's shard_model does
        model.set_attn_implementation(PACKED_SDPA)
    model.config.use_cache = True  # as a built model has it: the packed path must not depend on it
    batch = packed_batch(SHAPES)
    m = batch.mask > 0

    def alone():  # each sequence in a forward of its own, padded to the batch's width afterwards
        width = batch.mask.shape[1]
        return torch.cat([torch.nn.functional.pad(output_logp(model, batch.select([i]), 0.8),
                                                  (0, width - int(batch.output_lens[i])))
                          for i in range(batch.n_seqs)])

    ref, g_ref = logp_and_grads(model, batch, alone)
    calls: list[dict] = []
    for varlen in (False, True) if attn == "sliding_window" else (False,):
        if varlen:
            calls = varlen_standin()
        lp, grads = logp_and_grads(model, batch)
        torch.testing.assert_close(lp[m], ref[m], rtol=0, atol=1e-5)
        assert float(lp[~m].abs().max()) == 0.0  # 0 on padding, not garbage
        for a, b in zip(grads, g_ref):  # fp32 sums in another order: up to 1.3e-6 seen
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if attn == "sliding_window":
        assert calls and all(c["window_size"] == (2, 0) for c in calls)


def test_the_varlen_kernel_is_chosen_for_half_precision_cuda_only():
    from trainer.packed_attention import uses_varlen_kernel

    assert not uses_varlen_kernel(torch.zeros(1, 2, 4, 64, dtype=torch.bfloat16))  # CPU
    assert not uses_varlen_kernel(torch.zeros(1, 2, 4, 64))  # fp32 anywhere: the SDPA path


@pytest.fixture
def flash_attn_4_only(tmp_path, monkeypatch):
    """flash_attn as SGLang installs it: flash-attn-4's cute namespace package only."""
    cute = tmp_path / "flash_attn" / "cute"
    cute.mkdir(parents=True)
    (cute / "__init__.py").write_text("def flash_attn_varlen_func(*a, **k):\n    raise "
                                      "RuntimeError('a stand-in')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)
    importlib.invalidate_caches()
    yield
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        del sys.modules[name]
    importlib.invalidate_caches()


def test_flash_attn_4_alone_is_not_taken_for_fa2(flash_attn_4_only):
    """flash-attn-4 alone is not FA2, and its packed mask is flash_attention_4's."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    from trainer.model import VARLEN_ATTENTION, packed_mask, require_attention
    from trainer.packed_attention import flash_attention_implementations

    assert importlib.util.find_spec("flash_attn") is not None  # importable, yet no FA2
    found = flash_attention_implementations()
    assert "flash_attention_2" not in found and "flash_attention_4" in found
    with pytest.raises(ValueError, match="flash_attention_2.*found: flash_attention_4"):
        require_attention("flash_attention_2")
    require_attention("flash_attention_4")  # installed: accepted
    assert "flash_attention_4" in VARLEN_ATTENTION
    model = types.SimpleNamespace(config=types.SimpleNamespace(
        _attn_implementation="flash_attention_4", layer_types=["full_attention"]))
    assert packed_mask(model) == {"full_attention": None}
    assert ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_4"] is flash_attention_mask


def test_without_flash_attn_no_flash_implementation_is_found():
    from trainer.model import require_attention
    from trainer.packed_attention import flash_attention_implementations

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed here")
    assert flash_attention_implementations() == []
    with pytest.raises(ValueError, match="flash_attention_4.*found: none"):
        require_attention("flash_attention_4")
    require_attention("sdpa")
