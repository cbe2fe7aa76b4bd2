"""The engine's sampler (rollout_server/engine/sampling.py): inverse-CDF draws, top-k/top-p,
the logprob convention, and at most one read of the device per step."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from areal_like.settings.config import ModelConfig
from areal_like.weights.hf import build_model
from rollout_server.engine import scheduler as scheduler_mod
from rollout_server.engine.sampling import SamplingParams, prepare, sample
from rollout_server.engine.scheduler import Request, Scheduler

CPU = torch.device("cpu")
P = [0.5, 0.3, 0.15, 0.05]
LOGITS = torch.tensor([P]).log()


def draw(params: SamplingParams, uniforms: list[float], logits=LOGITS):
    n = len(uniforms)
    return sample(logits.expand(n, -1), prepare([params] * n, uniforms, CPU))


def counts(tokens: torch.Tensor, vocab: int) -> list[int]:
    return torch.bincount(tokens, minlength=vocab).tolist()


def test_each_uniform_picks_the_token_whose_interval_holds_it():
    # cumulative sums 0.5, 0.8, 0.95, 1.0: u lands in the interval of exactly one token
    tok, _ = draw(SamplingParams(), [0.0, 0.49, 0.51, 0.79, 0.81, 0.94, 0.96, 0.999])
    assert tok.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # top_p=0.6 keeps {0, 1} (mass before token 2 is 0.8 > 0.6): intervals of 0.5 / 0.8, 0.3 / 0.8
    tok, _ = draw(SamplingParams(top_p=0.6), [0.6, 0.624, 0.626, 0.999])
    assert tok.tolist() == [0, 0, 1, 1]
    # top_k=3 renormalizes over 0.95; top_p then applies to that set (SGLang's order)
    tok, _ = draw(SamplingParams(top_k=3), [0.52, 0.53, 0.84, 0.85, 0.999])
    assert tok.tolist() == [0, 1, 1, 2, 2]
    # top_p=0.85 over the top-3 set: mass before token 2 is 0.8 / 0.95 = 0.842 <= 0.85, kept
    tok, _ = draw(SamplingParams(top_k=3, top_p=0.85), [0.999])
    assert tok.tolist() == [2]
    # a cut keeps every token tied with the last one kept (bf16 logits tie often): top_k=2 of
    # logits [3, 2, 2, 1] keeps tokens 0, 1 and 2 whatever order a sort gives the tie
    tied = torch.tensor([[3.0, 2.0, 2.0, 1.0]])
    tok, _ = draw(SamplingParams(top_k=2), [0.999], tied)
    assert tok.tolist() == [2]


@pytest.mark.parametrize("params,expected", [
    (SamplingParams(), [500, 300, 150, 50]),
    (SamplingParams(top_p=0.6), [625, 375, 0, 0]),  # 0.5 / 0.8, 0.3 / 0.8
    (SamplingParams(top_k=2), [625, 375, 0, 0]),
    (SamplingParams(top_p=0.85), [526, 316, 158, 0]),  # mass before token 2: 0.8, kept
    (SamplingParams(temperature=0.5), [685, 247, 62, 7]),  # p^2 / sum p^2 (rounded)
])
def test_evenly_spread_uniforms_give_the_exact_frequencies(params, expected):
    # a draw is a function of its uniform: exact frequencies here are the distribution for
    # uniform random draws
    n = 1000
    tok, _ = draw(params, [(i + 0.5) / n for i in range(n)])
    got = counts(tok, 4)
    assert all(abs(g - e) <= 1 for g, e in zip(got, expected)), got


def test_logprobs_are_of_the_untruncated_tempered_distribution():
    # the logprob is log p of the token, not of the truncated set: log 0.5 / log 0.3, not
    # log(0.5 / 0.8)
    tok, lp = draw(SamplingParams(top_p=0.6), [0.1, 0.9])
    assert tok.tolist() == [0, 1]
    assert lp.tolist() == pytest.approx([math.log(0.5), math.log(0.3)], abs=1e-6)
    assert lp.dtype == torch.float32
    tok, lp = draw(SamplingParams(temperature=0.0), [0.99])  # greedy: T=1 logprob of the argmax
    assert tok.tolist() == [0] and lp.item() == pytest.approx(math.log(0.5), abs=1e-6)
    # temperature 0.5 sharpens: log_softmax(log p / 0.5) = log(p^2 / sum p^2)
    tok, lp = draw(SamplingParams(temperature=0.5, top_k=1), [0.99])
    assert tok.tolist() == [0]
    assert lp.item() == pytest.approx(math.log(0.25 / sum(p * p for p in P)), abs=1e-6)


def test_rows_of_a_mixed_batch_sample_as_if_alone():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    params = [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(top_k=5),
              SamplingParams(top_p=0.5, temperature=0.7), SamplingParams(top_k=1),
              SamplingParams(temperature=1.7, top_k=9, top_p=0.9)]
    uniforms = [0.37, 0.8, 0.91, 0.05, 0.5, 0.66]
    tok, lp = sample(logits, prepare(params, uniforms, CPU))
    for i, (p, u) in enumerate(zip(params, uniforms)):
        t1, lp1 = sample(logits[i:i + 1], prepare([p], [u], CPU))
        assert tok[i] == t1[0] and lp[i] == lp1[0]
    assert tok[1] == logits[1].argmax() and tok[4] == logits[4].argmax()


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return build_model(ModelConfig(max_position_embeddings=192))


HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def test_a_step_reads_the_device_once(model, monkeypatch):
    """Each way a tensor's value reaches Python waits for CUDA: counted per scheduler step."""
    reads, steps = [0], [0]

    def counting(fn):
        def wrapped(*args, **kwargs):
            reads[0] += 1
            return fn(*args, **kwargs)
        return wrapped

    def counted_sample(*args, **kwargs):
        steps[0] += 1
        return real_sample(*args, **kwargs)

    s = Scheduler(model, max_running=4, max_total_tokens=4096, context_len=192,
                  weight_version="0")
    real_sample = scheduler_mod.sample
    params = [SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=9, top_p=0.8),
              SamplingParams(max_new_tokens=12, temperature=0.0),
              SamplingParams(max_new_tokens=7, top_k=5, sampling_seed=3)]
    done = threading.Event()
    finished = []

    def fin(r):
        finished.append(r)
        if len(finished) == len(params):
            done.set()
    monkeypatch.setattr(scheduler_mod, "sample", counted_sample)
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    reqs = [Request(rid=str(i), input_ids=[1, 5 + i, 7, 9], params=p, stop_ids=frozenset(),
                    on_finish=fin) for i, p in enumerate(params)]
    s.start()
    try:
        for r in reqs:
            s.submit(r)
        assert done.wait(120), "requests did not finish"
    finally:
        s.stop()
        monkeypatch.undo()
    assert sorted(len(r.output_ids) for r in finished) == [7, 9, 12, 12]
    assert steps[0] >= 12 and reads[0] <= steps[0], (reads[0], steps[0])
