"""What ``kind=vllm`` settings refuse, and the flags a vLLM is launched with."""

from __future__ import annotations

import pytest

from areal_like.settings.config import ConfigError, EngineConfig, load_config


@pytest.mark.parametrize("over, message", [
    (["rollout.pause_mode=retract"], r"rollout.pause_mode='retract' is invalid: must be abort"),
    (["trainer.weight_sync.path=disk"], r"trainer.weight_sync.path='disk' is invalid"),
    (["+rollout.engine.vllm.port=3"], r"rollout.engine.vllm.port is not passed through"),
    (["+rollout.engine.vllm.api_key=x"], r"rollout.engine.vllm.api_key: credentials"),
    (["trainer.lora.rank=8", "trainer.weight_sync.path=distributed"],
     r"trainer.weight_sync.path='distributed' is invalid: must be auto or disk"),
    (["trainer.lora.rank=1024"], r"trainer.lora.rank=1024 is invalid: must be <= 512"),
    (["experiment=quickstart_lora"],  # its lm_head adapter
     r"trainer.lora.target_modules=.* is invalid: must be the decoder's linear layers only .*"
     r"vLLM 0.32 refuses an adapter of lm_head"),
    (["trainer.lora.rank=8", "+rollout.engine.vllm.max_loras=2"],
     r"rollout.engine.vllm.max_loras is not passed through with trainer.lora.rank > 0"),
])
def test_what_a_vllm_engine_does_not_offer_is_refused_by_the_settings(over, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["topology=cpu_vllm", *over])


def test_cpu_vllm_passes_its_flags_through_and_a_lora_job_adds_its_adapter_flags():
    """LoRA's flags (rank rounded up to one vLLM takes) and the adapter routes' environment."""
    from rollout_server.launch_vllm import VLLMProcess

    assert EngineConfig(kind="vllm", vllm={"max_num_seqs": 4}).vllm == {"max_num_seqs": 4}
    cfg = load_config(["topology=cpu_vllm", "model.path=/m", "trainer.lora.rank=4"])
    assert cfg.rollout.engine.kind == "vllm" and cfg.rollout.engine.vllm["enforce_eager"] is True
    assert cfg.trainer.weight_sync.path == "auto" and cfg.adapter_path == "disk"
    with_lora = VLLMProcess(cfg.model, cfg.rollout.engine, lora=cfg.trainer.lora)
    argv = with_lora.command("/tmp", {})[0]
    assert argv[argv.index("--max-lora-rank") + 1] == "8" and "--enable-lora" in argv
    assert argv[argv.index("--max-loras") + 1] == "3"
    assert with_lora.environment()["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    plain = VLLMProcess(cfg.model, cfg.rollout.engine)
    assert "--enable-lora" not in plain.command("/tmp", {})[0]
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in plain.environment()
