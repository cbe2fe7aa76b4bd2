"""The ``trainer.critic`` section: PPO with a value model (trainer/critic.py; formulas in
trainer/LOSSES.md section 10). Off by default; ``configs/loss/ppo_critic.yaml`` turns it on.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Annotated, Any

from areal_like.settings.config_checks import ConfigError, Section, above, at_least, within
from areal_like.settings.loss_schema import CRITIC_KINDS

C = "trainer.critic."
# model.* keys the critic may not change: its tokenizer and vocabulary are the policy's (it reads
# the policy's tokens)
SAME_AS_POLICY = ("tokenizer", "vocab_size")


@dataclass(kw_only=True)
class CriticConfig(Section):
    """PPO with a value model beside the policy (trainer/critic.py, trainer/LOSSES.md)."""

    key = C.rstrip(".")

    # train a value model beside the policy and take the actor's advantages from GAE over it
    # (loss=ppo_critic sets it)
    enabled: bool = False
    # overrides of model.* for the critic's backbone ({}: the policy's architecture and
    # weights, from its own path or config); e.g. {num_hidden_layers: 1} or {path: /models/small}
    model: dict = field(default_factory=dict)
    lr: Annotated[float, above(0)] = 1e-5  # the critic's AdamW learning rate
    weight_decay: Annotated[float, at_least(0)] = 0.0  # the critic's AdamW weight decay
    grad_clip: Annotated[float, above(0)] = 1.0  # the critic's global gradient-norm clip
    # policy versions at the start whose batches train only the critic (VAPO's value pre-training)
    warmup_steps: Annotated[int, at_least(0)] = 0
    gamma: Annotated[float, within(0, 1, "(]")] = 1.0  # discount of GAE per token
    # decoupled GAE (VC-PPO): the critic's returns with lambda_critic, the actor's advantages with
    # lambda_actor; adaptive_lambda: the actor's lambda per response 1 - 1/(alpha l) (VAPO)
    lambda_critic: Annotated[float, within(0, 1)] = 1.0
    lambda_actor: Annotated[float, within(0, 1)] = 0.95  # GAE lambda of the actor's advantages
    adaptive_lambda: bool = False  # the actor's lambda per response, 1 - 1/(alpha l) (VAPO)
    alpha: Annotated[float, above(0)] = 0.05  # alpha of adaptive_lambda
    value_clip: Annotated[float | None, above(0)] = 0.5  # None: unclipped value loss
    # per-token KL penalty in the reward: -kl_coef (log pi_behav - log pi_ref) (builds a reference)
    kl_coef: Annotated[float, at_least(0)] = 0.0
    whiten_advantages: bool = True  # the actor's advantages whitened over the batch's tokens

    def check_for_trainer(self, kernel: str, lora: bool, model_keys: tuple[str, ...]) -> None:
        """What the critic needs of the rest of the trainer's config (TrainerConfig calls it)."""
        if not self.enabled:
            return
        if lora:
            raise ConfigError("trainer.critic.enabled=true is not supported with "
                              "trainer.lora.rank > 0: the critic trains full weights; turn LoRA "
                              "off or the critic off")
        if kernel not in CRITIC_KINDS:
            raise ConfigError(f"trainer.critic.enabled=true is invalid with trainer.loss.kernel="
                              f"{kernel}: its advantages are its own; choose one of "
                              f"{', '.join(CRITIC_KINDS)}")
        for key in self.model:
            if key not in model_keys:
                raise ConfigError(f"{C}model.{key} is not a model.* key; choose among "
                                  f"{', '.join(model_keys)}")
            if key in SAME_AS_POLICY:
                raise ConfigError(f"{C}model.{key} may not be set: the critic reads the policy's "
                                  "tokens, so its tokenizer and vocabulary are the policy's")

    def model_config(self, policy_model: Any) -> Any:
        """The critic backbone's ``ModelConfig``: the policy's with ``model`` applied."""
        from dataclasses import replace

        return replace(policy_model, **self.model)


def model_keys(model_cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(model_cls))
