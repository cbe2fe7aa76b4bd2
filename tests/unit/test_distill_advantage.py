"""On-policy distillation (trainer/LOSSES.md section 11): hand vectors of each token's advantage,
the teacher's log-probs over the wire and the WAL into the batch, and a step that reads them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from areal_like.settings.config import load_config
from areal_like.weights.hf import build_model
from areal_like.wire import protocol as P
from areal_like.wire.trajectory import Trajectory
from buffer.wal import WriteAheadLog
from trainer.advantages import distill_advantages
from trainer.data import groups_to_batch
from trainer.model import Policy, attach_logprobs
from trainer.step import StepSettings, train_step

TASK = torch.tensor([[0.5, 0.5, 0.0], [-0.5, -0.5, -0.5]])
TEACHER = torch.tensor([[-1.0, -0.5, 0.0], [-2.0, -1.0, -3.0]])
BEHAV = torch.tensor([[-1.5, -0.25, 0.0], [-1.0, -1.0, -1.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])  # row 0: 2 tokens; row 1: a context token


# kl = teacher - behav: row 0: 0.5, -0.25, (padding); row 1: -1, (context), -2
@pytest.mark.parametrize("has, kl_w, task_w, groups, want", [
    # 0.5 * A + 2 * kl on each token of the mask
    ([True, True], 2.0, 0.5, None, [[1.25, -0.25, 0.0], [-2.25, 0.0, -4.25]]),
    # row 1 without the teacher's log-probs: its task advantage alone
    ([True, False], 1.0, 0.0, None, [[0.5, -0.25, 0.0], [-0.5, 0.0, -0.5]]),
    # one group: position 0's kl mean -0.25 leaves +-0.75; a position with one token: 0
    ([True, True], 2.0, 0.5, [7, 7], [[1.75, 0.25, 0.0], [-1.75, 0.0, -0.25]]),
    # a group of one row each: every kl term is its own mean
    ([True, True], 2.0, 0.5, [3, 9], [[0.25, 0.25, 0.0], [-0.25, 0.0, -0.25]]),
    # a row without the teacher is not in the mean (row 0 alone: 0) and keeps A_task
    ([True, False], 1.0, 0.0, [0, 0], [[0.0, 0.0, 0.0], [-0.5, 0.0, -0.5]]),
])
def test_mixed_advantage_by_hand(has, kl_w, task_w, groups, want):
    adv = distill_advantages(TASK, TEACHER, BEHAV, MASK, torch.tensor(has), kl_weight=kl_w,
                             task_reward_weight=task_w,
                             group_ids=None if groups is None else torch.tensor(groups))
    torch.testing.assert_close(adv, torch.tensor(want))


def sample(n: int, teacher: list[float] | None, reward: float = 1.0) -> Trajectory:
    return Trajectory.of(prompt_ids=np.array([5, 6, 7]), output_ids=np.arange(10, 10 + n),
                         behav_logp=np.full(n, -1.0, np.float32), versions=np.zeros(n, np.int32),
                         reward=reward, finish_reason="stop",
                         teacher_logp=None if teacher is None else np.array(teacher, np.float32))


def group(*trajectories: Trajectory) -> P.TrajectoryGroup:
    return P.TrajectoryGroup(group_id="g", server_id="s", lease_id="0", prompt_index=0, epoch=0,
                             trajectories=list(trajectories))


def test_teacher_logprobs_cross_the_wire_into_the_batch():
    g = P.decode(P.encode(group(sample(3, [-0.5, -1.0, -2.0]), sample(2, None))))
    assert g.trajectories[0].teacher_logp.tolist() == [-0.5, -1.0, -2.0]
    assert g.trajectories[1].teacher_logp is None
    batch = groups_to_batch([g])
    assert batch.teacher_logp.tolist() == [[-0.5, -1.0, -2.0], [0.0, 0.0, 0.0]]
    assert batch.has_teacher.tolist() == [True, False]
    assert batch.select([1]).teacher_logp.tolist() == [[0.0, 0.0]]
    plain = groups_to_batch([P.decode(P.encode(group(sample(2, None))))])
    assert plain.teacher_logp is None and plain.has_teacher is None  # off: nothing carried


def test_teacher_logprobs_survive_the_buffers_write_ahead_log(tmp_path):
    """A group's frame replayed from the WAL after a restart keeps the teacher's log-probs."""
    frame = P.encode(group(sample(3, [-0.5, -1.0, -2.0])))
    wal = WriteAheadLog(tmp_path)
    list(wal.replay())
    wal.open({"state": {}})
    wal.append_group("g", frame)
    wal.commit()
    wal.close()
    (record,) = [r for r in WriteAheadLog(tmp_path).replay() if r.kind == "G"]
    replayed = P.decode(record.frame).trajectories[0]
    assert replayed.teacher_logp.tolist() == [-0.5, -1.0, -2.0]


def test_a_wrong_length_or_a_nonfinite_teacher_logprob_is_refused():
    with pytest.raises(P.ProtocolError, match="length 2 != len") as info:
        sample(3, [-0.5, -1.0])
    assert info.value.field == "teacher_logp"
    with pytest.raises(P.ProtocolError, match="finite") as info:
        P.decode(P.encode(group(sample(2, [-0.5, float("nan")]))))
    assert info.value.field == "teacher_logp"


def _step_against_by_hand(*extra: str):
    """One step of a GRPO batch with the teacher's log-probs under ``extra`` distill keys, and the
    same step given ``by_hand(a)`` advantages (``a``: 0.5 x GRPO's advantage of rewards 1, 0)."""
    cfg = load_config(["distill.teachers=[http://127.0.0.1:1]", "distill.kl_weight=2.0",
                       "distill.task_reward_weight=0.5", "loss=grpo", "task.temperature=1.0",
                       *extra])
    torch.manual_seed(0)
    model = attach_logprobs(build_model(cfg.model))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    policy = Policy(model=model, optimizer=opt,
                    scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
                    device=torch.device("cpu"), rank=0, world_size=1)
    batch = groups_to_batch([group(sample(3, [-0.5, -1.0, -2.0], 1.0),
                                   sample(2, [-3.0, -1.0], 0.0))])
    stats = train_step(policy, batch, StepSettings.from_config(cfg), None)

    def plain(by_hand: list[list[float]]) -> dict:
        return train_step(policy, batch, StepSettings.from_config(load_config(["loss=grpo"])),
                          None, advantages=torch.tensor(by_hand))
    return stats, plain, 0.5 / (0.5 ** 0.5 + 1e-6)


def test_a_training_step_reads_the_teacher_as_the_vectors_say_and_centres_it_per_group():
    """The loss of the same step given the mixed advantages by hand; the sampled reverse KL."""
    with_teacher, plain, a = _step_against_by_hand()
    # grpo on rewards (1, 0): +-1/(sqrt(0.5) + 1e-6), times 0.5, plus 2 * (teacher - behav)
    by_hand = plain([[a + 1.0, a + 0.0, a - 2.0], [-a - 4.0, -a + 0.0, 0.0]])
    assert with_teacher["loss"] == pytest.approx(by_hand["loss"], rel=1e-5)
    # behav - teacher: (-0.5 + 0 + 1 + 2 + 0) / 5 tokens
    assert with_teacher["distill_reverse_kl"] == pytest.approx(2.5 / 5)
    # distill.kl_baseline=group
    centred, plain, a = _step_against_by_hand("distill.kl_baseline=group")
    # teacher - behav: (0.5, 0, -1) and (-2, 0); one group: position 0's mean -0.75 leaves
    # 1.25 and -1.25, position 1's 0 leaves 0 and 0, position 2 has one token: 0. Times 2, plus
    # 0.5 * grpo's +-1/(sqrt(0.5) + 1e-6)
    by_hand = plain([[a + 2.5, a, a], [-a - 2.5, -a, 0.0]])
    assert centred["loss"] == pytest.approx(by_hand["loss"], rel=1e-5)
    assert centred["distill_reverse_kl"] == pytest.approx(2.5 / 5)  # the KL itself, uncentred
