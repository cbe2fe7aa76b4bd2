"""Engines that lag by design (trainer/engine_lag.py) and OAPL's published defaults.

weight_sync.every = L: engines advance every L steps and admission admits lag L - 1; delay = D:
engines get version v - D's weights bit for bit under that label; OAPL beta1 = 1, beta2 = 1e-3 by
hand. EngineSchedule runs with a recording broadcaster around a real module and optimizer.
"""

from __future__ import annotations

import math

import pytest
import torch

from areal_like.settings.config import ConfigError, load_config
from areal_like.settings.loss_schema import LossConfig, OAPLConfig
from buffer.staleness import StalenessPolicy
from trainer.advantages import AdvantageInputs, oapl_advantages
from trainer.engine_lag import EngineSchedule
from trainer.losses import compute_policy_loss
from trainer.weight_sync import SyncReport


class RecordingBroadcaster:
    """What the engines were sent (label, weights) and what the buffer was told."""

    def __init__(self):
        self.pushed: list[tuple[int, torch.Tensor]] = []
        self.announced: list[int] = []

    def push(self, model, version, announce=None, wait=True):
        self.pushed.append((version, model.weight.detach().clone()))
        self.announced.append(version if announce is None else announce)
        return SyncReport(version=version)

    def announce(self, version):
        self.announced.append(version)
        return SyncReport(version=version)


def _train(every: int, delay: int, steps: int, final_version: int | None = None, start: int = 0):
    """Train from version start to steps, the schedule after each: (broadcaster, the weights of
    each version, the version the engines serve after each, the schedule)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wb = RecordingBroadcaster()
    cfg = load_config([f"trainer.weight_sync.every={every}", f"trainer.weight_sync.delay={delay}",
                       f"buffer.max_staleness={max(every - 1, delay)}"]).trainer.weight_sync
    sched = EngineSchedule(cfg, wb, model, final_version=final_version or steps)
    weights, served = {}, []
    for v in range(start, steps + 1):
        if v > start:
            opt.zero_grad()
            model(torch.ones(1, 3)).sum().backward()
            opt.step()
        weights[v] = model.weight.detach().clone()
        sched.after_step(v)
        served.append(wb.pushed[-1][0] if wb.pushed else None)
    return wb, weights, served, sched


@pytest.mark.parametrize("every, delay, served", [
    (3, 0, [0, 0, 0, 3, 3, 3, 6, 6, 6, 9, 10]),  # multiples of 3, and the final version
    (1, 2, [0, 0, 0, 1, 2, 3, 4]),  # max(0, v - 2)
])
def test_engines_advance_every_L_steps_or_serve_exactly_v_minus_D(every, delay, served):
    wb, weights, got, sched = _train(every=every, delay=delay, steps=len(served) - 1)
    assert got == served  # the engines' version after each trainer version 0, 1, ...
    assert [v for v, _ in wb.pushed] == sorted(set(served))
    assert wb.announced == list(range(len(served)))  # the buffer hears every version
    for v, w in wb.pushed:  # each label carries exactly its own weights
        torch.testing.assert_close(w, weights[v], rtol=0, atol=0)
    # the trainer keeps its own
    torch.testing.assert_close(sched.model.weight.detach(), weights[len(served) - 1], rtol=0,
                               atol=0)


def test_repush_resends_what_the_engines_should_serve():
    wb, weights, served, sched = _train(every=4, delay=0, steps=5, final_version=10)
    assert served[-1] == 4 and wb.announced[-1] == 5  # version 5 was only announced
    sched.repush(5)
    assert wb.pushed[-1][0] == 4 and wb.announced[-1] == 5
    torch.testing.assert_close(wb.pushed[-1][1], weights[4], rtol=0, atol=0)


def test_a_resumed_lagged_push_that_reached_nobody_is_sent_again_on_a_stall():
    """Resumed at 5 with L = 4: a stall repushes version 5's snapshot under its label."""
    wb, weights, _, sched = _train(every=4, delay=0, steps=7, final_version=20, start=5)
    assert [v for v, _ in wb.pushed] == [5] and wb.announced == [5, 6, 7]
    sched.repush(7)
    assert wb.pushed[-1][0] == 5 and wb.announced[-1] == 7
    torch.testing.assert_close(wb.pushed[-1][1], weights[5], rtol=0, atol=0)
    # the trainer's own weights are back after
    assert torch.equal(sched.model.weight, weights[7]) and not torch.equal(weights[7], weights[5])


@pytest.mark.parametrize("every", [1, 2, 4, 8])
def test_admission_admits_exactly_the_lag(every):
    # Engines re-synced every L steps serve L * floor(v / L). With eta = L - 1 every credit the
    # buffer grants at version v goes to an engine it accepts, every group is consumed fresh, and
    # the largest staleness seen is exactly L - 1.
    B, lag = 4, every - 1
    policy = StalenessPolicy(max_staleness=lag, groups_per_step=B, max_inflight=64, engine_lag=lag)
    started, store, seen = 0, [], []
    for v in range(4 * every + 3):
        engine = every * (v // every)
        assert policy.engine_can_start(engine, v)
        # consumed: one batch per version so far
        grant = policy.capacity(v * B, started, in_flight=0)
        assert grant == B  # exactly one batch per version: nothing is generated to go stale
        store += [engine] * grant
        started += grant
        batch, store = store[:B], store[B:]
        policy.check_batch(batch, v)
        seen += [v - h for h in batch]
    assert max(seen) == lag
    assert not policy.engine_can_start(0, every)  # an engine one version further behind is refused


def test_config_requires_max_staleness_to_cover_the_lag():
    assert load_config(["trainer.weight_sync.every=4",
                        "buffer.max_staleness=3"]).trainer.weight_sync.engine_lag == 3
    with pytest.raises(ConfigError, match=r"buffer.max_staleness.*>= 3"):
        load_config(["trainer.weight_sync.every=4", "buffer.max_staleness=2"])
    with pytest.raises(ConfigError, match=r"buffer.max_staleness.*>= 8"):
        load_config(["trainer.weight_sync.delay=8", "buffer.max_staleness=4"])
    with pytest.raises(ConfigError, match="trainer.weight_sync.delay"):
        load_config(["trainer.weight_sync.every=2", "trainer.weight_sync.delay=1",
                     "buffer.max_staleness=4"])


def test_oapl_published_betas():
    cfg = load_config(["loss=oapl"]).trainer.loss
    assert (cfg.oapl.beta1, cfg.oapl.beta2) == (1.0, 1e-3)
    with pytest.raises(ConfigError, match="known keys in trainer.loss.oapl: beta1, beta2"):
        load_config(["loss=oapl", "trainer.loss.oapl.beta=0.5"])
    # One group, R = [1, 0, 1, 1]: V_hat = 1 * log((3e + 1) / 4) = 0.8279889 (beta1 = 1), so the
    # targets are R - V_hat; one token each with Delta = logp - behav = [2, -1, 0, 3]; the loss is
    # mean((1e-3 Delta - A)^2) (beta2 = 1e-3) and d/dlogp_i = (2 * 1e-3 / 4) (1e-3 Delta_i - A_i).
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    mask = torch.ones(4, 1)
    adv = oapl_advantages(AdvantageInputs(r, [0] * 4, mask, "grpo"), OAPLConfig()).values
    v_hat = math.log((3 * math.e + 1) / 4)
    torch.testing.assert_close(adv[:, 0], r - v_hat, rtol=1e-6, atol=1e-6)
    behav = torch.zeros(4, 1)
    logp = torch.tensor([[2.0], [-1.0], [0.0], [3.0]], requires_grad=True)
    loss, _ = compute_policy_loss(LossConfig(kernel="oapl"), logp=logp, prox_logp=None,
                                  behav_logp=behav,
                                  advantages=adv, mask=mask)
    resid = [1e-3 * d - (ri - v_hat) for d, ri in zip([2.0, -1.0, 0.0, 3.0], [1.0, 0.0, 1.0, 1.0])]
    assert float(loss.detach()) == pytest.approx(sum(x * x for x in resid) / 4, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad[:, 0], torch.tensor([2e-3 / 4 * x for x in resid]),
                               rtol=1e-5, atol=1e-9)
