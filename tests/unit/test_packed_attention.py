"""Packed attention's device contract and attention selection (``trainer/packed_attention.py``,
``trainer/model.py``), on CPU.

* A packed forward and backward reads the device back at most once per micro-batch: every
  host-sync entry point of ``torch.Tensor`` is counted while ``output_logp(packed=True)`` runs.
* The CUDA path's call into torch's ``varlen_attn``: layout, boundaries, causality and GQA, checked
  by a reference kernel with its signature standing in for the flash kernel CPU torch lacks.
* flash-attention detection where ``flash_attn`` is only ``flash-attn-4``'s ``flash_attn/cute``
  namespace package (an SGLang install): FA2 is not there, FA4 is, and its mask is "no mask".
"""

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
    """Count the calls through which a CUDA tensor's value reaches the host (each one waits for
    the device): ``item``, ``tolist``, ``cpu``, ``numpy``, ``int()``/``float()``/``bool()`` and
    index use of a tensor, and a blocking ``.to("cpu")``. On this CPU-only machine every device
    reads ``cpu``, so a ``.to`` counts when its target is written as the host (the string
    ``"cpu"``), not a tensor's ``device`` (a copy onto the compute device, or none), and not
    ``non_blocking`` (a copy onto the device from the host waits for nothing)."""
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
    """Four sequences (three lengths) through 2 decoder layers, forward and backward: one read
    of the lengths; padded, no read at all. Fails on the per-layer boundaries (seen on the
    previous code: 10, a ``tolist`` per layer and pass plus the lengths' and the longest
    length's reads)."""
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


def _reference_varlen(calls):
    """torch's ``varlen_attn`` signature ([T, H, D] in and out, GQA by ``enable_gqa``), computed
    per sequence with SDPA on CPU; records what it was called with."""
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
    """``varlen_standin()``: from now on the packed path takes the varlen kernel (CUDA's; here the
    SDPA stand-in above); returns the list of its calls."""
    import trainer.packed_attention as pa

    def choose() -> list[dict]:
        calls: list[dict] = []
        monkeypatch.setattr(pa, "varlen_attn", _reference_varlen(calls))
        monkeypatch.setattr(pa, "uses_varlen_kernel", lambda q: True)
        return calls
    return choose


def test_the_varlen_kernel_gets_the_row_in_its_layout(varlen_standin):
    """With the varlen kernel chosen (as on CUDA in bf16) each sequence's log-probs and gradients
    equal the exact SDPA path's: q/k/v as [T, H, D], the micro-batch's ``cu_seqlens`` and longest
    length, causal, GQA (2 KV heads for 6 query heads) flagged. Fails on a layout or boundary
    slip (checked once: the output returned as [1, H, L, D] without the transpose)."""
    model, batch = packed_model(), packed_batch(SHAPES)

    def run():
        model.zero_grad()
        lp = output_logp(model, batch, 0.8, chunk_tokens=5, packed=True)
        (lp * batch.mask).sum().backward()
        return lp.detach(), [p.grad.clone() for p in model.parameters()]

    exact, g_exact = run()
    calls = varlen_standin()
    varlen, g_varlen = run()
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


def test_a_sliding_window_stays_inside_each_packed_sequence(varlen_standin):
    """A Qwen2 whose layers all slide (window 3): each packed sequence's log-probs and gradients
    equal that sequence's run alone through transformers' own sliding-window mask, on the SDPA
    path and through the varlen call (``window_size`` (2, 0)). Fails when the packed path drops
    the window (seen: today's code, which read every layer as fully causal)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import trainer.packed_attention as pa
    from trainer.model import attach_logprobs

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                      sliding_window=3, max_window_layers=0)
    model = attach_logprobs(Qwen2ForCausalLM(cfg).eval())
    model.set_attn_implementation(pa.PACKED_SDPA)
    assert set(model.config.layer_types) == {"sliding_attention"}
    batch = packed_batch(SHAPES)
    m = batch.mask > 0

    def run(fn):
        model.zero_grad()
        lp = fn()
        (lp * batch.mask).sum().backward()
        return lp.detach(), [p.grad.clone() for p in model.parameters()]

    def alone():
        width = batch.mask.shape[1]
        return torch.cat([torch.nn.functional.pad(output_logp(model, batch.select([i]), 0.8),
                                                  (0, width - int(batch.output_lens[i])))
                          for i in range(batch.n_seqs)])

    ref, g_ref = run(alone)
    calls: list[dict] = []
    for varlen in (False, True):
        if varlen:
            calls = varlen_standin()
        lp, grads = run(lambda: output_logp(model, batch, 0.8, chunk_tokens=5, packed=True))
        torch.testing.assert_close(lp[m], ref[m], rtol=0, atol=1e-5)
        for a, b in zip(grads, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert calls and all(c["window_size"] == (2, 0) for c in calls)


def test_the_varlen_kernel_is_chosen_for_half_precision_cuda_only():
    from trainer.packed_attention import uses_varlen_kernel

    assert not uses_varlen_kernel(torch.zeros(1, 2, 4, 64, dtype=torch.bfloat16))  # CPU
    assert not uses_varlen_kernel(torch.zeros(1, 2, 4, 64))  # fp32 anywhere: the SDPA path


@pytest.fixture
def flash_attn_4_only(tmp_path, monkeypatch):
    """``flash_attn`` as an SGLang install has it: the ``flash_attn/cute`` namespace package of
    ``flash-attn-4`` (no ``flash_attn/__init__.py``, no FA2), first on ``sys.path``."""
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
    """Fails on detection by ``find_spec("flash_attn")`` (what tests/gpu/test_packing_cuda.py
    did: FA2 was run, and failed in transformers' import of it), and on a ``VARLEN_ATTENTION``
    without ``flash_attention_4`` (its packed mask was then None: a dense mask it never reads)."""
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
