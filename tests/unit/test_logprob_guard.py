"""trainer/logprob_guard.py: the comparison, the refusal message and the probe request, on hand-made
values."""

from __future__ import annotations

import pytest

import trainer.logprob_guard as guard
from areal_like.daemon import Daemon
from areal_like.settings.config import load_config
from trainer.logprob_guard import (
    PROBE_TOKENS,
    Probe,
    compare_logprobs,
    guard_tol,
    mismatch_message,
    probe_sampling,
)


@pytest.mark.parametrize("engine,trainer,mean,worst", [
    ([-1.0, -2.0, -0.5, -3.0], [-1.01, -1.98, -0.5, -3.03], 0.015, 0.03),
    ([-1.3, -2.3, -0.8], [-1.0, -2.0, -0.5], 0.3, 0.3),  # every log-prob off by 0.3
    # T=1 vs T=2 of a 2-token vocabulary with logits (2, 0): log_softmax([2,0]) vs ([1,0])
    ([-0.126928, -2.126928], [-0.313262, -1.313262], 0.5, 0.813666),
    # bf16 kernels leave single tokens off by a few tenths: the mean stays small, the max does not
    ([-1.0] * 15 + [-1.4], [-1.0] * 16, 0.025, 0.4),
], ids=["within", "shifted", "temperature", "outlier"])
def test_compare_gives_the_mean_and_the_worst_token_difference(engine, trainer, mean, worst):
    assert compare_logprobs(engine, trainer) == pytest.approx((mean, worst), abs=1e-6)


def test_compare_refuses_misaligned_or_empty():
    with pytest.raises(ValueError, match="aligned, got 2 and 3 tokens"):
        compare_logprobs([0.0, 0.0], [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="non-empty"):
        compare_logprobs([], [])


def test_mismatch_message_names_engine_difference_tolerance_and_causes():
    p = Probe(server_id="rollout-3", engine_url="http://10.0.0.7:30000", prompt_ids=[1, 2],
              output_ids=[5, 6, 7], engine_logp=[-1.0, -1.0, -1.0])
    msg = mismatch_message(p, 0.31, 0.9, 0.05, 2.0)
    for part in ("rollout-3", "http://10.0.0.7:30000", "by 0.31 nats", "max 0.9)",
                 "trainer.logprob_guard_tol=0.05", "temperature 2",
                 "SGLANG_RETURN_ORIGINAL_LOGPROB", "top-p/top-k", "Refusing to train"):
        assert part in msg, part
    # at a tiny tolerance the difference is still shown (it used to read "0.0000")
    tiny = mismatch_message(p, 5e-8, 2e-7, 1e-9, 1.0)
    assert "by 5e-08 nats per token on average (max 2e-07)" in tiny, tiny
    assert "trainer.logprob_guard_tol=1e-09" in tiny, tiny


def test_probe_request_is_untruncated_at_the_run_temperature():
    assert probe_sampling(0.7) == {"max_new_tokens": PROBE_TOKENS, "temperature": 0.7,
                                   "top_p": 1.0, "top_k": -1, "ignore_eos": True}


@pytest.mark.parametrize("mine", [[-1.0, -1.0], [float("nan")] * 2])
def test_a_failed_guard_is_a_refusal_the_supervisor_does_not_restart(monkeypatch, mine):
    """The guard's verdict ends the daemon with exit 2 (``launch/local.py`` and the Slurm script
    restart exit 1): a restarted trainer would probe the same engines and fail again, once per
    restart (seen with 2 ranks and 2 servers: 3 restarts, then 'no restarts left'). A nan
    difference fails too (it passed: ``nan > tol`` is false; seen with trainer.lora.alpha=inf,
    then the job waited for data forever, every group refused for its nan log-probs)."""
    probe = Probe(server_id="rollout-0", engine_url="http://127.0.0.1:1", prompt_ids=[1, 2],
                  output_ids=[3, 4], engine_logp=[-3.0, -3.0])
    monkeypatch.setattr(guard, "collect_probes", lambda *a: ([probe], {}))
    monkeypatch.setattr(guard, "trainer_logprobs", lambda *a: mine)

    class Trainer(Daemon):
        name = "trainer"

        def run(self) -> None:
            guard.run_guard(None, None, rank=0, buffer=None, served=["rollout-0"],
                            prompt_ids=[1, 2], temperature=1.0, tol=0.05)

    assert Trainer(metrics_port=None).serve() == 2


def test_the_default_tolerance_follows_the_model_dtype():
    """fp32 keeps 0.05 nats; bf16 engines and trainers differ more (the measurement in
    trainer/logprob_guard.py's docstring): a bf16 job gets 0.1 unless it sets its own."""
    for dtype, tol in (("float32", 0.05), ("bfloat16", 0.1), ("float16", 0.1)):
        cfg = load_config([f"model.dtype={dtype}"])
        assert guard_tol(cfg.trainer.logprob_guard_tol, cfg.model.dtype) == tol
    cfg = load_config(["model.dtype=bfloat16", "trainer.logprob_guard_tol=0.02"])
    assert guard_tol(cfg.trainer.logprob_guard_tol, cfg.model.dtype) == 0.02
    cfg = load_config(["model.dtype=bfloat16", "trainer.logprob_guard_tol=0"])
    assert guard_tol(cfg.trainer.logprob_guard_tol, cfg.model.dtype) == 0  # off
