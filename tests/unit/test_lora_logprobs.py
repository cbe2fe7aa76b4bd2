"""The trainer's log-probs of a LoRA model (``trainer.model.policy_logprobs``: decoder, then the
chunked lm_head) equal the model's own forward, adapter on ``lm_head`` included, and equal the
base model's with the adapters off (the KL reference)."""

from __future__ import annotations

import numpy as np
import torch

from areal_like.settings.config import LoraConfig, ModelConfig, load_config
from areal_like.weights.hf import build_model
from areal_like.weights.lora import adapters_disabled, add_adapters, is_adapter
from areal_like.wire.protocol import TrajectoryGroup
from areal_like.wire.trajectory import Trajectory
from trainer.data import groups_to_batch
from trainer.logprob_guard import trainer_logprobs
from trainer.model import Policy, attach_logprobs, policy_logprobs
from trainer.step import StepSettings, batch_logp, recompute_prox_logp, train_step


def reference_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), -1)
    return logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]


def randomize_adapters(model, gen: torch.Generator | None = None):
    """Adapters of weight ~0.3 (PEFT starts B at zero: the adapters would change nothing)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter(name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def test_measuring_passes_run_without_dropout():
    """The proximal/reference log-probs (``batch_logp``) and the guard's (``trainer_logprobs``) of a
    policy in train mode with LoRA dropout 0.5 are the dropout-free numbers the engine computes, the
    same twice, and the model is left in train mode. Fails without ``evaluating`` (differences up
    to about 1 nat)."""
    cfg = load_config(["trainer.lora.rank=4", "trainer.lora.dropout=0.5"])
    model = attach_logprobs(add_adapters(build_model(cfg.model), cfg.trainer.lora))
    randomize_adapters(model, torch.Generator().manual_seed(0)).train()
    trajs = [Trajectory.of(prompt_ids=np.array([5, 6, 7]), output_ids=np.arange(10, 16),
                           behav_logp=np.full(6, -1.0), versions=np.zeros(6, np.int32), reward=1.0,
                           finish_reason="stop")]
    batch = groups_to_batch([TrajectoryGroup(group_id="g", server_id="s",
                                             lease_id="0", prompt_index=0,
                                             epoch=0, trajectories=trajs)])
    s = StepSettings.from_config(cfg)
    first, second = (batch_logp(model, batch, s, torch.device("cpu")) for _ in range(2))
    ids = torch.tensor([[5, 6, 7, *range(10, 16)]])
    with torch.no_grad():
        logp = torch.log_softmax(model.eval()(ids).logits.float() / s.temperature, -1)
    want = logp[0, 2:-1].gather(-1, ids[0, 3:, None])[:, 0]
    model.train()
    torch.testing.assert_close(first[0, :6], want, rtol=0, atol=1e-5)
    assert torch.equal(first, second) and model.training
    guard = trainer_logprobs(model, [5, 6, 7], list(range(10, 16)), s.temperature,
                             torch.device("cpu"))
    torch.testing.assert_close(torch.tensor(guard), want, rtol=0, atol=1e-5)
    assert model.training


def test_policy_logprobs_include_every_adapter_and_drop_them_when_disabled():
    cfg = ModelConfig()
    model = add_adapters(build_model(cfg), LoraConfig(rank=4, target_modules=["q_proj", "lm_head"]))
    gen = torch.Generator().manual_seed(0)
    randomize_adapters(model, gen)
    ids = torch.randint(4, cfg.vocab_size, (2, 12), generator=gen)
    positions = torch.arange(11).expand(2, -1)
    with torch.no_grad():
        got = policy_logprobs(model, ids, positions, 1.0, chunk_tokens=5)
        with adapters_disabled(model):
            off = policy_logprobs(model, ids, positions, 1.0, chunk_tokens=5)
    # log-probs down to -48 nats here: a few fp32 ulps of the chunked lm_head's different
    # summation order reach 1.1e-5 on some CPUs (every run on one CI machine), hence rtol too
    torch.testing.assert_close(got, reference_logprobs(model, ids), rtol=1e-6, atol=1e-5)
    base = reference_logprobs(build_model(cfg), ids)
    torch.testing.assert_close(off, base, rtol=1e-6, atol=1e-5)
    assert (got - base).abs().max() > 1e-2  # the adapters change the numbers


def test_the_proximal_logprobs_of_a_step_run_without_dropout_too():
    """With one minibatch, decoupled PPO's pi_prox was the training forward's own log-probs
    (``fuse_prox``), dropout and all: against engine log-probs of the same weights (no dropout),
    ``mismatch_kl`` read 0.005 where it is 0. With LoRA dropout pi_prox is the separate
    dropout-free pass, as areal_like/weights/LORA.md says."""
    cfg = load_config(["trainer.lora.rank=4", "trainer.lora.dropout=0.5"])
    torch.manual_seed(0)
    model = randomize_adapters(attach_logprobs(add_adapters(build_model(cfg.model),
                                                            cfg.trainer.lora)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-9)
    policy = Policy(model=model.train(), optimizer=opt,
                    scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
                    device=torch.device("cpu"), rank=0, world_size=1)
    trajs = [Trajectory.of(prompt_ids=np.array([5, 6, 7]), output_ids=np.arange(10, 10 + n),
                           behav_logp=np.zeros(n), versions=np.zeros(n, np.int32), reward=r,
                           finish_reason="stop") for n, r in ((6, 1.0), (4, 0.0))]
    batch = groups_to_batch([TrajectoryGroup(group_id="g", server_id="s", lease_id="0",
                                             prompt_index=0, epoch=0, trajectories=trajs)])
    s = StepSettings.from_config(cfg)
    assert s.kernel.needs_prox and s.num_minibatches == 1
    batch.behav_logp = batch_logp(model, batch, s, policy.device)  # what the engine samples with
    stats = train_step(policy, batch, s, recompute_prox_logp(policy, batch, s))
    assert stats["mismatch_kl"] < 1e-9
