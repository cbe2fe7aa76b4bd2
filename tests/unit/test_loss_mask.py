"""Trajectory.loss_mask: masked context tokens train exactly like columns deleted by hand, for
every kernel, aggregation and estimator; the mask crosses the wire; bad or old frames refused."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

from areal_like.settings.config import AGG_MODES, ESTIMATORS, LossConfig
from areal_like.wire import protocol as P
from areal_like.wire.group_checks import content_problem
from areal_like.wire.trajectory import Trajectory, as_f32, as_i32, runs_of
from trainer.advantages import AdvantageInputs, compute_advantages
from trainer.data import groups_to_batch
from trainer.losses import KERNELS, compute_policy_loss

# 3 trajectories, 9 output positions; 0 = context (environment / tool tokens),
# padding after the length
LENGTHS = [9, 7, 5]
CONTEXT = [[3, 4, 5], [2, 3], []]
GROUP_IDS = torch.tensor([0, 0, 1])
REWARDS = torch.tensor([1.0, 0.0, 0.5])
SCALE = 9.0  # Dr.GRPO's constant C (seq-mean-token-sum-norm), fixed on both sides


def masked_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (len(LENGTHS), max(LENGTHS))
    mask = torch.zeros(shape)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1.0
        mask[i, CONTEXT[i]] = 0.0
    # garbage (large, non-finite-adjacent) values on context and padding: they must not matter
    def rand(scale: float) -> torch.Tensor:
        x = -torch.rand(shape, generator=g, dtype=torch.float64).float() * scale - 0.05
        return torch.where(mask > 0, x, torch.full(shape, -30.0))
    return {"logp": rand(2.0), "prox": rand(2.0), "behav": rand(2.0), "ref": rand(2.0),
            "mask": mask}


def compact(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's generated tokens moved left; context and padding columns deleted."""
    width = int(mask.sum(-1).max())
    out = torch.zeros(t.shape[0], width, dtype=t.dtype)
    for i in range(t.shape[0]):
        kept = t[i][mask[i] > 0]
        out[i, :len(kept)] = kept
    return out


def loss_and_grad(kind: str, agg: str, b: dict, adv: torch.Tensor):
    lp = b["logp"].clone().requires_grad_(True)
    cfg = LossConfig(kernel=kind, agg=agg, loss_scale_factor=SCALE, kl_coef=0.1)
    loss, stats = compute_policy_loss(cfg, logp=lp, prox_logp=b["prox"],
                                      behav_logp=b["behav"], advantages=adv,
                                      mask=b["mask"], ref_logp=b["ref"])
    loss.backward()
    return loss.detach(), lp.grad, stats


def kernel_advantages(kind: str, mask: torch.Tensor, estimator: str) -> torch.Tensor:
    w, g2 = (torch.tensor([0.9, 1.2, 1.0], dtype=torch.float64),
             torch.tensor([2.0, 3.0, 1.0], dtype=torch.float64))
    a = AdvantageInputs(REWARDS, GROUP_IDS, mask, estimator, score_terms=lambda: (w, g2))
    return KERNELS[kind].advantages(a, LossConfig(kernel=kind).params).values


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("kind", sorted(KERNELS))
def test_context_tokens_train_like_tokens_removed_by_hand(kind, agg):
    full = masked_batch(seed=len(kind) * 7 + len(agg))
    cut = {k: compact(v, full["mask"]) for k, v in full.items()}
    cut["mask"] = compact(full["mask"], full["mask"])
    adv_full = kernel_advantages(kind, full["mask"], "grpo")
    adv_cut = kernel_advantages(kind, cut["mask"], "grpo")
    torch.testing.assert_close(compact(adv_full, full["mask"]), adv_cut)
    loss_f, grad_f, stats_f = loss_and_grad(kind, agg, full, adv_full)
    loss_c, grad_c, stats_c = loss_and_grad(kind, agg, cut, adv_cut)
    torch.testing.assert_close(loss_f, loss_c, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(compact(grad_f, full["mask"]), grad_c, rtol=1e-5, atol=1e-7)
    assert torch.all(grad_f[full["mask"] == 0] == 0)  # context tokens get no gradient
    for k in stats_c:
        torch.testing.assert_close(stats_f[k], stats_c[k], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_estimator_ignores_context_tokens(estimator):
    full = masked_batch(seed=3)["mask"]
    adv_full = compute_advantages(estimator, REWARDS, GROUP_IDS, full)
    adv_cut = compute_advantages(estimator, REWARDS, GROUP_IDS, compact(full, full))
    torch.testing.assert_close(compact(adv_full, full), adv_cut)
    assert torch.all(adv_full[full == 0] == 0)


def trajectory(n: int, context: list[int], loss_mask: bool = True) -> Trajectory:
    mask = np.ones(n, np.int32)
    mask[context] = 0
    return Trajectory.of(prompt_ids=as_i32([5, 6]), output_ids=as_i32(np.arange(10, 10 + n)),
                         behav_logp=as_f32(np.where(mask == 1, -0.5, 0.0)),
                         versions=as_i32(np.zeros(n)), reward=1.0, finish_reason="stop",
                         loss_mask=as_i32(mask) if loss_mask else None)


def test_the_trainers_loss_mask_is_the_trajectorys_across_the_wire():
    group = P.TrajectoryGroup(group_id="g", server_id="s", lease_id="l", prompt_index=0, epoch=0,
                              trajectories=[trajectory(n, c) for n, c in zip(LENGTHS, CONTEXT)])
    batch = groups_to_batch([P.decode(P.encode(group))])
    torch.testing.assert_close(batch.mask, masked_batch(0)["mask"])
    assert batch.n_tokens == sum(LENGTHS) - sum(map(len, CONTEXT))
    assert torch.all(batch.input_ids[0, 2:11] == torch.arange(10, 19))  # context stays in the input
    plain = groups_to_batch([P.TrajectoryGroup(group_id="g", server_id="s", lease_id="l",
                                               prompt_index=0, epoch=0,
                                               trajectories=[trajectory(4, [], loss_mask=False)])])
    assert plain.mask.tolist() == [[1.0, 1.0, 1.0, 1.0]]  # single-turn: every token generated


def test_a_bad_mask_or_an_old_version_frame_is_refused():
    for mask, why in (([1, 2], "0 \\(context\\) or 1"), ([1], "length 1 != len")):
        with pytest.raises(P.ProtocolError, match=why) as info:
            Trajectory.of(prompt_ids=[1], output_ids=[2, 3], behav_logp=[0.0, 0.0],
                          versions=[0, 0], reward=0.0, finish_reason="stop", loss_mask=mask)
        assert info.value.field == "loss_mask"
    group = P.TrajectoryGroup(group_id="g", server_id="s", lease_id="l", prompt_index=0, epoch=0,
                              trajectories=[trajectory(3, [1])])
    # on the wire, as a sender not built on Trajectory.of might
    for bad in ([1, 0, 2], [1, -1, 1], [1, 256, 1]):
        wire = msgpack.unpackb(P.encode(group))
        wire["trajectories"][0]["loss_mask"][2] = runs_of(bad, "loss_mask")[2].tobytes()
        # decode checks the mask's length (the hot path); admission checks every value
        decoded = P.decode(msgpack.packb(wire))
        assert content_problem(decoded, vocab_size=0).startswith(
            "bad_loss_mask: trajectory 0 has loss_mask"), bad
    assert content_problem(group, vocab_size=0) is None
    wire = msgpack.unpackb(P.encode(group))
    del wire["trajectories"][0]["loss_mask"]  # a frame without its mask: named as such
    with pytest.raises(P.ProtocolError, match="missing required field") as info:
        P.decode(msgpack.packb(wire))
    assert info.value.field == "trajectories[0].loss_mask"
    wire = msgpack.unpackb(P.encode(group))
    wire["protocol"] = 1
    del wire["trajectories"][0]["loss_mask"]  # as a version-1 sender wrote it
    speaks = P.PROTOCOL_VERSION
    with pytest.raises(P.ProtocolError,
                       match=f"unsupported protocol version 1 \\(this side speaks {speaks}\\)"):
        P.decode(msgpack.packb(wire))
