"""fastpath.py against transformers per family: greedy tokens and logprobs equal."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

from rollout_server.engine import fastpath, padded
from rollout_server.engine.sampling import SamplingParams
from rollout_server.engine.scheduler import Request, Scheduler
from tests.unit.test_engine_scheduler import greedy, run_all

WAIT_S = 120.0  # generous: the machine is shared
EOS = 2
SIZES = dict(vocab_size=104, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=192,
             eos_token_id=EOS, pad_token_id=0, bos_token_id=1)


def tiny(kind: str):
    torch.manual_seed(0)
    cfg = {"qwen2": lambda: Qwen2Config(**SIZES),
           "llama": lambda: LlamaConfig(**SIZES, attention_bias=True),
           "qwen3": lambda: Qwen3Config(**SIZES, head_dim=16)}[kind]()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    # a random init this small gives near-uniform logits; sharpen them so argmax is stable
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(4, 104, (int(k),), generator=g).tolist()
            for k in torch.randint(2, 40, (n,), generator=g)]


def run(model, ps, params, *, fast: bool = True, max_running: int = 3,
        sched: list | None = None) -> list[Request]:
    s = Scheduler(model, max_running=max_running, max_total_tokens=4096, context_len=192,
                  weight_version="0")
    if not fast:
        s.path = padded
    if sched is not None:
        sched.append(s)
    s.start()
    try:
        return run_all(s, ps, params)
    finally:
        s.stop()


def _logprobs_equal_forward(model, ps, got: list[Request], temperature: float) -> None:
    for p, r in zip(ps, got):
        with torch.no_grad():
            logits = model(torch.tensor([p + r.output_ids])).logits[0, len(p) - 1:-1].float()
        ref = (torch.log_softmax(logits / temperature, -1)
               .gather(1, torch.tensor(r.output_ids)[:, None])[:, 0])
        assert (ref - torch.tensor(r.output_logprobs)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3"])
def test_family_greedy_equals_generate_and_logprobs_equal_forward(kind):
    torch.set_num_threads(1)
    model = tiny(kind)
    assert fastpath.supports(model)
    ps, limits = prompts(7, seed=3), [6, 30, 12, 1, 45, 20, 9]
    # 7 requests through 3 slots: rows join and leave every step
    got = run(model, ps, [SamplingParams(max_new_tokens=m, temperature=0.0) for m in limits])
    assert [r.output_ids for r in got] == [greedy(model, p, m) for p, m in zip(ps, limits)]
    for m, r in zip(limits, got):
        assert r.finish_reason == ({"type": "stop", "matched": EOS} if r.output_ids[-1] == EOS
                                   else {"type": "length", "length": m})
        assert r.output_versions == ["0"] * len(r.output_ids)
    sampled = run(model, ps, [SamplingParams(max_new_tokens=20, temperature=0.8) for _ in ps],
                  max_running=4)
    _logprobs_equal_forward(model, ps, sampled, 0.8)
    _greedy_equals_generate(model, ps[:3], 10, fast=False)  # the fallback's 4D mask fits it too


@pytest.mark.parametrize("fast", [True, False])
def test_identical_prompts_share_one_prefill(fast):
    torch.set_num_threads(1)
    model = tiny("qwen2")
    a, b = prompts(2, seed=7)
    ps = [a, b, a, a, b, a]
    made: list[Scheduler] = []
    got = run(model, ps, [SamplingParams(max_new_tokens=12, temperature=0.0) for _ in ps],
              fast=fast, max_running=6, sched=made)
    assert made[0].prefill_tokens == len(a) + len(b)
    assert [r.output_ids for r in got] == [greedy(model, p, 12) for p in ps]
    sampled = run(model, ps, [SamplingParams(max_new_tokens=16, temperature=1.0, sampling_seed=i)
                              for i in range(6)],
                  fast=fast, max_running=6)
    assert len({tuple(r.output_ids) for r in sampled}) == 6  # shared prompt KV, independent samples
    _logprobs_equal_forward(model, ps, sampled, 1.0)


def _greedy_equals_generate(model, ps, limit: int, **kw) -> None:
    got = run(model, ps, [SamplingParams(max_new_tokens=limit, temperature=0.0) for _ in ps], **kw)
    for p, r in zip(ps, got):
        assert r.finish_reason["type"] != "abort", r.finish_reason
        assert r.output_ids == greedy(model, p, limit)


def test_only_stock_layouts_take_the_fast_path_and_the_others_go_through_their_forward():
    class ScaledAttention(Qwen2Attention):  # e.g. a remote-code variant: same weights, other math
        def forward(self, *args, **kwargs):
            out, w = super().forward(*args, **kwargs)
            return 3.0 * out, w
    torch.set_num_threads(1)
    ps = prompts(3, seed=13)
    model = tiny("qwen2")
    model.model.layers[0].self_attn.__class__ = ScaledAttention
    assert not fastpath.supports(model)
    _greedy_equals_generate(model, ps, 12)
    hooked = tiny("qwen2")
    hooked.model.layers[1].register_forward_hook(lambda mod, args, out: out * 0.5)
    assert not fastpath.supports(hooked)
    _greedy_equals_generate(hooked, ps, 12)
    assert fastpath.supports(tiny("qwen2"))

    class Wrapped(torch.nn.Module):  # a module that only forwards: its forward is the model
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config
    assert not fastpath.supports(Wrapped(tiny("qwen2")))
    sliding = AutoModelForCausalLM.from_config(Qwen2Config(**SIZES, use_sliding_window=True,
                                                           sliding_window=8,
                                                           max_window_layers=0))
    assert not fastpath.supports(sliding)


def test_a_weight_swap_between_steps_is_seen_by_the_next_forward():
    """fastpath holds no weight reference: a swap is seen by the next pass."""
    torch.set_num_threads(1)
    model, other = tiny("qwen3"), tiny("qwen3")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ps = prompts(3, seed=19)
    s = Scheduler(model, max_running=3, max_total_tokens=4096, context_len=192, weight_version="0")
    assert s.path is fastpath
    s.start()
    try:
        for phase in ("before", "after"):
            if phase == "after":
                new = dict(other.named_parameters())
                s.call(lambda _: [setattr(p, "data", new[n].detach().clone())
                                  for n, p in model.named_parameters()]).result(WAIT_S)
            done, finished = {}, threading.Event()

            def fin(r, done=done, finished=finished):
                done[r.rid] = r
                if len(done) == len(ps):
                    finished.set()
            for i, p in enumerate(ps):
                s.submit(Request(rid=f"{phase}{i}", input_ids=p,
                                 params=SamplingParams(max_new_tokens=10, temperature=0),
                                 stop_ids=frozenset([EOS]), on_finish=fin))
            assert finished.wait(WAIT_S)
            with torch.no_grad():
                refs = [other.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False,
                                       eos_token_id=EOS,
                                       pad_token_id=0)[0, len(p):].tolist() for p in ps]
            same = [done[f"{phase}{i}"].output_ids == ref for i, ref in enumerate(refs)]
            # before: the weights really differ
            assert all(same) if phase == "after" else not all(same)
    finally:
        s.stop()
