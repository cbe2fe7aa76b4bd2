"""Bad critic settings (trainer.critic, areal_like/settings/critic_schema.py) fail in one line
naming the key when the config loads, and a critic whose tokenizer is not the policy's fails the
preflight (launch/preflight.py check_critic), before anything starts."""

from __future__ import annotations

import dataclasses

import pytest

from areal_like.settings.config import ConfigError, load_config
from areal_like.tasks.tokenizer import bpe_tokenizer, load_tokenizer
from launch import preflight as pf


@pytest.mark.parametrize("override, message", [
    ("trainer.critic.gamma=0", "trainer.critic.gamma=0.0 is invalid: must be in (0, 1]"),
    ("trainer.critic.gamma=1.5", "trainer.critic.gamma=1.5 is invalid: must be in (0, 1]"),
    ("trainer.critic.lambda_actor=1.2",
     "trainer.critic.lambda_actor=1.2 is invalid: must be in [0, 1]"),
    ("trainer.critic.lambda_critic=-0.1",
     "trainer.critic.lambda_critic=-0.1 is invalid: must be in [0, 1]"),
    ("trainer.critic.alpha=0", "trainer.critic.alpha=0"),
    ("trainer.critic.value_clip=0", "trainer.critic.value_clip=0"),
    ("trainer.critic.lr=0", "trainer.critic.lr=0"),
    ("trainer.lora.rank=4", "trainer.critic.enabled=true is not supported with "
                            "trainer.lora.rank > 0"),
    ("loss=vcpo", "trainer.critic.enabled=true is invalid with trainer.loss.kernel=vcpo"),
    ("+trainer.critic.model.vocab_size=200", "trainer.critic.model.vocab_size may not be set"),
    ("+trainer.critic.model.tokenizer=bpe", "trainer.critic.model.tokenizer may not be set"),
    ("+trainer.critic.model.hidden=3", "trainer.critic.model.hidden is not a model.* key"),
])
def test_bad_critic_settings_fail_naming_the_key(override, message):
    overrides = ["loss=ppo_critic", override]
    if override == "loss=vcpo":
        overrides = ["loss=vcpo", "trainer.critic.enabled=true"]
    with pytest.raises(ConfigError) as e:
        load_config(overrides)
    assert message in str(e.value)


def test_a_smaller_critic_by_config_loads():
    cfg = load_config(["loss=ppo_critic", "+trainer.critic.model.num_hidden_layers=1"])
    assert cfg.trainer.critic.model_config(cfg.model).num_hidden_layers == 1
    assert cfg.trainer.critic.model_config(cfg.model).vocab_size == cfg.model.vocab_size


def test_a_critic_with_another_tokenizer_fails_the_preflight(tmp_path):
    cfg = load_config(["loss=ppo_critic"])

    def critic_dir(name, tokenizer):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"")
        tokenizer.save_pretrained(d)
        return d

    other = critic_dir("other", bpe_tokenizer(512))
    same = critic_dir("same", load_tokenizer(cfg.model))
    for d, want in ((other, 1), (same, 0)):
        critic = dataclasses.replace(cfg.trainer.critic, model={"path": str(d)})
        c = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, critic=critic))
        problems = pf.check_critic(c)
        assert len(problems) == want, problems
        if want:
            assert problems[0].startswith(f"trainer.critic.model.path={str(d)!r} has another "
                                          "tokenizer than the policy's")
    missing = dataclasses.replace(cfg.trainer.critic, model={"path": str(tmp_path / "nope")})
    c = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, critic=missing))
    assert pf.check_critic(c)[0].startswith("trainer.critic.model.path=")
