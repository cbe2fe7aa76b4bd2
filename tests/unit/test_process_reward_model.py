"""A process reward model: one score per ``step_delimiter`` step on the token completing it,
their sum the reward, the critic's token-level rewards; hand vectors and one real trajectory."""

from __future__ import annotations

import pytest
import torch
from test_reward_model import episode

from areal_like.settings.config import ConfigError, TaskConfig, load_config
from areal_like.tasks.task import make_task
from areal_like.tasks.tokenizer import char_tokenizer
from areal_like.weights.hf import save_tokenizer
from areal_like.wire.group_checks import content_problem
from areal_like.wire.protocol import TrajectoryGroup, decode, encode
from areal_like.wire.trajectory import Trajectory
from benchmarks import reward_model_demo
from rollout_server.reward_model import process_rewards, step_ends
from trainer.critic import critic_advantages
from trainer.data import groups_to_batch

TOK = char_tokenizer()
CRITIC = load_config(["loss=ppo_critic", "trainer.critic.gamma=0.5",
                      "trainer.critic.lambda_critic=1.0"]).trainer.critic


def group_of(*trajectories: Trajectory) -> TrajectoryGroup:
    return TrajectoryGroup(group_id="g", server_id="s", lease_id="L", prompt_index=0, epoch=0,
                           trajectories=list(trajectories))


def trajectory(n: int, reward: float, process: list | None) -> Trajectory:
    return Trajectory.of(prompt_ids=[5, 6], output_ids=[40] * n, behav_logp=[-0.5] * n,
                         versions=[0] * n, reward=reward, finish_reason="stop",
                         metadata={} if process is None else {"process_rewards": process})


def test_steps_end_after_each_delimiter_and_with_the_response():
    assert step_ends("ab|cd", "|") == [3, 5]
    assert step_ends("ab|cd|", "|") == [3, 6]  # no empty step after the last delimiter
    assert step_ends("abcd", "|") == [4]
    assert step_ends("", "|") == [0]  # an empty response: one empty step
    assert step_ends("a\n\nb", "\n\n") == [3, 4]


def test_step_boundaries_to_token_positions_to_gae_returns_by_hand():
    # tokens "a", "b|c", "d", "<eos>": step "ab|" ends inside token 1, step "cd" at token 2
    pieces = ["a", "b|c", "d", ""]

    def decode_ids(ids):
        return "".join(pieces[i] for i in ids)

    steps = ((3, 0.4), (5, -0.1))
    assert process_rewards(decode_ids, [0, 1, 2, 3], steps, 2.0) == [[1, 0.8], [2, -0.2]]
    assert process_rewards(decode_ids, [], steps, 2.0) == []  # no token to hold them
    # reward = 0.8 - 0.2 (the steps, weight 2) + 0.5 (the rule's share): token rewards
    # [0, 0.8, -0.2, 0.5]; gamma 0.5, lambda 1, V = 0: returns from the end
    # G3 = 0.5, G2 = -0.2 + 0.25 = 0.05, G1 = 0.8 + 0.025 = 0.825, G0 = 0.4125
    rows = [trajectory(4, 1.1, [[1, 0.8], [2, -0.2]]), trajectory(2, 1.0, None)]
    batch = groups_to_batch([group_of(*rows)])
    torch.testing.assert_close(batch.process_rewards,
                               torch.tensor([[0.0, 0.8, -0.2, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(batch.rewards, torch.tensor([1.1, 1.0]))  # what GRPO reads
    _, returns = critic_advantages(CRITIC, batch, torch.zeros(2, 4))
    torch.testing.assert_close(returns, torch.tensor([[0.4125, 0.825, 0.05, 0.5],
                                                      [0.5, 1.0, 0.0, 0.0]]))
    # without step rewards the same reward sits on the last token alone
    assert groups_to_batch([group_of(trajectory(4, 1.1, None))]).process_rewards is None


def test_process_rewards_off_the_output_or_not_finite_are_refused_before_training():
    assert content_problem(group_of(trajectory(4, 1.0, [[3, 0.5]])), 0) is None
    for bad in ([[4, 0.5]], [[-1, 0.5]], [[0, float("nan")]], [[0]], [["0", 1.0]], {"0": 1}):
        why = content_problem(group_of(trajectory(4, 1.0, bad)), 0)
        assert why is not None and why.startswith("bad_process_rewards: trajectory 0"), bad


def split(t: Trajectory) -> tuple[list[int], list[float]]:
    """A trajectory's process rewards as (tokens, rewards)."""
    pairs = t.metadata["process_rewards"]
    return [p[0] for p in pairs], [p[1] for p in pairs]


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory):
    """A tiny scalar-head classifier (random weights: any score will do)."""
    torch.manual_seed(0)
    model, tok = reward_model_demo.build("random")
    out = tmp_path_factory.mktemp("prm")
    model.save_pretrained(out)
    save_tokenizer(tok, out)
    return str(out)


def test_a_real_trajectory_scored_per_step_reaches_the_critic_at_its_step_boundaries(prm_dir):
    example = make_task(TaskConfig(name="reverse", digits=4)).example(0)
    answers = [example.answer[:2] + "|" + example.answer[2:], example.answer]
    group, model, _, _ = episode(prm_dir, answers, process=True, step_delimiter="|", weight=2.0,
                                 rule_weight=0.5)
    p = example.prompt
    s1 = model.scores([p + answers[0][:3], p + answers[0]])
    [s2] = model.scores([p + answers[1]])
    first, second = group.trajectories
    # one token a character, then <eos>: "xy|zw..." has steps ending on tokens 2 and n - 1
    n = len(answers[1])
    assert split(first) == ([2, n], pytest.approx([2 * s1[0], 2 * s1[1]]))
    assert split(second) == ([n - 1], pytest.approx([2 * s2]))
    # critic-free kernels read the sum (+ the rule's share: 0 with a "|" in the answer, 1 without)
    assert first.reward == pytest.approx(2 * sum(s1), abs=1e-5)
    assert second.reward == pytest.approx(2 * s2 + 0.5, abs=1e-5)
    wired = decode(encode(group))  # as the buffer and the trainer receive it
    assert content_problem(wired, TOK.vocab_size) is None
    batch = groups_to_batch([wired])
    r = torch.zeros(2, n + 2, dtype=torch.float64)  # the token rewards the critic should see
    r[0, 2], r[0, n], r[1, n - 1], r[1, n] = 2 * s1[0], 2 * s1[1], 2 * s2, 0.5
    torch.testing.assert_close(batch.process_rewards, (r * (r != 0.5)).float())
    # gamma 0.5, lambda 1, V = 0: every reward discounted back from its token
    _, returns = critic_advantages(CRITIC, batch, torch.zeros(2, n + 2))
    expected = torch.tensor([[sum(r[i, j] * 0.5 ** (j - t) for j in range(t, n + 2))
                              for t in range(n + 2)] for i in range(2)]) * batch.mask
    torch.testing.assert_close(returns, expected.float(), atol=1e-5, rtol=1e-5)


def test_a_process_reward_model_without_a_delimiter_is_refused():
    """Its non-scalar head: test_reward_model.py."""
    with pytest.raises(ConfigError, match="task.reward_model.step_delimiter=''.*process=true"):
        load_config(["task.reward_model.path=x", "task.reward_model.process=true"])
    with pytest.raises(ConfigError, match="task.reward_model.step_delimiter='|'"):
        load_config(["task.reward_model.path=x", "task.reward_model.step_delimiter=|"])
