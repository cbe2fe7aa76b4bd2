"""The ``task.reward_model`` section: a learned reward model scoring a task's responses
(rollout_server/reward_model.py; user docs: rollout_server/ROLLOUT.md, "Reward models"). Off while
``path`` is empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from areal_like.settings.config_checks import DEVICE, Bound, Section, at_least, check, one_of

R = "task.reward_model."
KINDS = ("classifier", "causal_lm")
AUTO_DEVICE = Bound("auto, " + DEVICE.rule, lambda v: v == "auto" or DEVICE.test(v))


@dataclass(kw_only=True)
class RewardModelConfig(Section):
    key = R.rstrip(".")

    # a local Hugging Face directory: a sequence classifier with a scalar head (num_labels=1), or a
    # causal LM (kind=causal_lm) whose logit of ``token`` after the text is the score
    path: str = ""
    # classifier (a scalar head) or causal_lm (a token's logit)
    kind: Annotated[str, one_of(*KINDS)] = "classifier"
    token: str = ""  # kind=causal_lm: the token whose logit is the score (one token, e.g. "Yes")
    tokenizer: str = ""  # a local tokenizer directory; empty: path's own
    # the text scored, from the prompt's text and the decoded response
    template: Annotated[str, Bound("a text holding {prompt} and {response}", lambda t: all(
        "{" + k + "}" in t for k in ("prompt", "response")))] = "{prompt}{response}"
    batch_size: Annotated[int, at_least(1)] = 32  # responses per forward pass
    # where the reward model runs: auto (on a GPU topology a GPU of its own beside each rollout
    # server's engine, placed by the layout (launch/placement.py); else the CPU), cpu, or cuda[:N]
    # (a GPU the rollout server sees; on a GPU topology only cuda, the same as auto)
    device: Annotated[str, AUTO_DEVICE] = "auto"
    # reward = weight * model score + rule_weight * the task's rule reward (0: the model alone; the
    # rule's reward is kept in each trajectory's metadata as rule_reward either way)
    weight: float = 1.0
    rule_weight: float = 0.0  # the rule reward's weight in the sum above
    # a process reward model: one score per step, each step's score the model's score of the text
    # up to that step's end; the reward is weight * the steps' sum (+ the rule's), and each step's
    # share lands on its last token as a token-level reward for the critic (trainer.critic)
    process: bool = False
    # process=true: the text that ends each step of a response (e.g. "\n\n"; a last step without it
    # ends with the response)
    step_delimiter: str = ""

    def __post_init__(self):
        super().__post_init__()
        check(R + "token", bool(self.token) == (self.kind == "causal_lm"),
              "set exactly when kind=causal_lm", self.token)
        check(R + "step_delimiter", bool(self.step_delimiter) == self.process,
              "set exactly when process=true (a process reward model scores each step)",
              self.step_delimiter)

    @property
    def enabled(self) -> bool:
        return bool(self.path)
