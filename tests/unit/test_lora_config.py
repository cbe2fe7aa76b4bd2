"""``trainer.lora``: bad input is refused before anything starts, with one error naming the key."""

from __future__ import annotations

import re

import pytest
import torch

from areal_like.settings.config import ConfigError, load_config, to_yaml
from areal_like.weights.hf import build_meta_model
from areal_like.weights.lora import add_adapters
from launch import preflight as pf
from launch.placement import with_weight_path
from rollout_server.launch_sglang import sglang_command
from trainer.export import main
from trainer.facts import TrainerFacts
from trainer.weight_sync import SENDERS, WeightBroadcaster


@pytest.mark.parametrize("override, key", [
    ("trainer.lora.rank=-1", "trainer.lora.rank"),
    ("trainer.lora.dropout=1.0", "trainer.lora.dropout"),
    ("trainer.lora.alpha=0", "trainer.lora.alpha"),
    ("trainer.lora.alpha=-16", "trainer.lora.alpha"),
    # inf: scaling inf x B = 0 is nan, every log-prob nan; the job waited for data forever
    ("trainer.lora.alpha=inf", "trainer.lora.alpha"),
    ("trainer.lora.target_modules=[]", "trainer.lora.target_modules"),
    # the reference is the base without the adapter
    ("trainer.ref_path=/tmp/ref", "trainer.ref_path"),
    ("trainer.weight_sync.path=disk", "trainer.weight_sync.path"),  # embedded: the group
    ("trainer.weight_sync.path=tensor", "trainer.weight_sync.path"),
    ("rollout.engine.kind=url rollout.engine.url=http://h:1", "rollout.engine.kind"),
    ("topology=cpu_sglang trainer.weight_sync.path=distributed", "trainer.weight_sync.path"),
    ("topology=cpu_sglang trainer.weight_sync.path=tensor", "trainer.weight_sync.path"),
    # the launcher's LoRA flags: a pass-through of them won over trainer.lora
    ("topology=cpu_sglang +rollout.engine.sglang.max_lora_rank=4",
     "rollout.engine.sglang.max_lora_rank"),
    ("topology=cpu_sglang +rollout.engine.sglang.enable_lora=false",
     "rollout.engine.sglang.enable_lora"),
])
def test_bad_lora_settings_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(["trainer.lora.rank=4", *override.split()])


def test_sglang_serves_the_jobs_adapters_over_the_disk_path():
    cfg = load_config(["topology=cpu_sglang", "trainer.lora.rank=4", "model.path=/m",
                       "trainer.lora.target_modules=[q_proj,v_proj]"])
    assert with_weight_path(cfg).trainer.weight_sync.path == "disk"
    argv = " ".join(sglang_command(cfg.model, cfg.rollout.engine, 1, lora=cfg.trainer.lora))
    assert "--enable-lora --max-lora-rank 4 --lora-target-modules q_proj v_proj" in argv
    assert "--lora-backend torch_native" in argv  # on CPU: the kernels without Triton


@pytest.mark.parametrize("topology,path", [("cpu_sglang", "disk"), ("local_cpu", "distributed")])
def test_a_trainer_started_by_hand_sends_the_adapter_on_the_engine_kinds_path(topology, path,
                                                                              tmp_path):
    """No ``areal-like run`` resolved ``weight_sync.path=auto``: the trainer reads it as the path
    the job's engine kind loads an adapter from (before: the group path, which SGLang refuses)."""
    # the facts read the model's context from its config.json
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 256, "vocab_size": 104}')
    cfg = load_config([f"topology={topology}", "trainer.lora.rank=4", f"model.path={tmp_path}"])
    assert cfg.trainer.weight_sync.path == "auto"
    facts = TrainerFacts.from_run(cfg)
    wb = WeightBroadcaster(cfg.trainer.weight_sync, buffer_address="tcp://127.0.0.1:9", rank=1,
                           device=torch.device("cpu"), adapter_path=facts.adapter_path)
    assert type(wb.sender) is SENDERS[path]
    wb.close()


def test_lora_is_off_by_default_and_on_with_a_rank():
    assert not load_config([]).trainer.lora.enabled
    cfg = load_config(["trainer.lora.rank=8"])
    assert cfg.trainer.lora.enabled and "down_proj" in cfg.trainer.lora.target_modules


@pytest.mark.parametrize("overrides, problem", [
    ([], None),  # every default target exists in the Qwen2 model
    (["trainer.lora.target_modules=[q_proj,query_key_value]"],
     r"trainer\.lora\.target_modules.*query_key_value"),
    (["trainer.lora.target_modules=[q_proj,lm_head]", "model.tie_word_embeddings=true"],
     r"trainer\.lora\.target_modules.*tied"),
    (["trainer.lora.target_modules=[q_proj,lm_head]"], None),  # untied
    # a model built from its config (no model.path, no warm start to save it) has no directory an
    # adapter's base_model_name_or_path could name (it was null: PEFT could load only the merged
    # export): such exports are refused naming export.merged=true
    (["warm_start.steps=0"], r"set export\.merged=true"),
    (["warm_start.steps=0", "export.merged=true"], None),
    (["warm_start.steps=0", "export.at_end=false"], None),
    (["warm_start.steps=10"], None),
])
def test_preflight_checks_the_adapters_before_start(overrides, problem):
    cfg = load_config(["trainer.lora.rank=8", *overrides])
    if problem is None:
        assert pf.checked(cfg) == cfg
        return
    with pytest.raises(pf.PreflightError) as e:
        pf.checked(cfg)
    [got] = e.value.problems
    assert re.search(problem, got), got


def test_the_trainer_refuses_a_missing_target_too():
    cfg = load_config(["trainer.lora.rank=8", "trainer.lora.target_modules=[q_proj,c_attn]"])
    with pytest.raises(ConfigError, match=r"trainer\.lora\.target_modules.*c_attn"):
        add_adapters(build_meta_model(cfg.model), cfg.trainer.lora)


def test_areal_like_export_of_such_a_checkpoint_is_refused_naming_the_key(tmp_path, capsys):
    ckpt = tmp_path / "checkpoints" / "v00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.pt").write_bytes(b"")  # refused before anything is read
    config = tmp_path / "config.yaml"
    config.write_text(to_yaml(load_config(["trainer.lora.rank=8", "warm_start.steps=0"])))
    assert main([str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {config}: export.merged=false") and "export.merged=true" in err
    assert not (tmp_path / "out").exists()
