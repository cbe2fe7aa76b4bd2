"""The vLLM implementation of the engine client without a vLLM: SGLang's sampling params in
vLLM's names, vLLM's ``/inference/v1/generate`` answer parsed (hand-written bodies in the shape
vLLM 0.32 answers, tests/vllm checks them against the real one), and the settings ``kind=vllm``
refuses before anything starts."""

from __future__ import annotations

import pytest

from areal_like.engines import engine_client
from areal_like.engines.client import EngineError
from areal_like.engines.sglang import SGLangClient
from areal_like.engines.vllm import VLLMClient, parse_vllm_output, vllm_sampling
from areal_like.settings.config import ConfigError, EngineConfig, load_config


def test_sglang_sampling_params_are_sent_in_vllms_names_with_the_sampled_log_prob():
    sp = {"max_new_tokens": 8, "temperature": 0.7, "top_p": 1.0, "top_k": -1,
          "stop_token_ids": [2], "ignore_eos": True, "sampling_seed": 5, "n": 1}
    assert vllm_sampling(sp) == {"max_tokens": 8, "temperature": 0.7, "top_p": 1.0, "top_k": 0,
                                 "stop_token_ids": [2], "ignore_eos": True, "seed": 5,
                                 "logprobs": 0}


@pytest.mark.parametrize("sp", [{"regex": "a+"}, {"n": 2}])
def test_a_sampling_param_vllm_does_not_take_is_refused_naming_it(sp):
    with pytest.raises(EngineError, match="vLLM takes none of the sampling params"):
        vllm_sampling(sp)


def _answer(ids, logps, spans, finish="length"):
    return {"request_id": "r1", "choices": [{
        "index": 0, "finish_reason": finish, "token_ids": ids,
        "logprobs": {"content": [{"token_id": t, "logprob": lp} for t, lp in zip(ids, logps)]},
        "weight_versions": [{"version": v, "start": a, "end": b} for v, a, b in spans]}]}


def test_a_generate_answer_gives_tokens_log_probs_and_each_tokens_version():
    out = parse_vllm_output(_answer([30, 31, 80], [-1.5, -0.25, -3.0],
                                    [("20", 0, 1), ("21", 1, 3)], finish="abort"))
    assert (out.rid, out.output_ids, out.logprobs) == ("r1", [30, 31, 80], [-1.5, -0.25, -3.0])
    assert out.weight_spans == [("20", 0, 1), ("21", 1, 3)] and out.weight_version == "21"
    assert out.finish_reason == "abort" and out.abort_status is None  # a pause: resubmitted


@pytest.mark.parametrize("body", [
    {"choices": []},
    _answer([30, 31], [-1.0], []),  # a token without its log-prob
    _answer([30], [-1.0], [], finish="error"),
])
def test_an_answer_of_another_shape_is_an_error_naming_the_route(body):
    with pytest.raises(EngineError, match=r"/inference/v1/generate: HTTP 200: .unexpected"):
        parse_vllm_output(body)


def test_the_engine_kind_picks_the_client():
    assert type(engine_client("vllm", "http://h:1")) is VLLMClient
    for kind in ("sglang", "embedded", "url"):
        assert type(engine_client(kind, "http://h:1")) is SGLangClient


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


def test_cpu_vllm_passes_its_flags_through():
    engine = load_config(["topology=cpu_vllm"]).rollout.engine
    assert engine.kind == "vllm" and engine.vllm["enforce_eager"] is True
    assert EngineConfig(kind="vllm", vllm={"max_num_seqs": 4}).vllm == {"max_num_seqs": 4}


def test_a_lora_job_starts_vllm_with_its_adapter_flags_and_runtime_loading():
    """LoRA's flags (rank rounded up to one vLLM takes) and the environment that opens vLLM's
    adapter routes; without LoRA neither (tests/vllm/test_vllm_lora.py runs them for real)."""
    from rollout_server.launch_vllm import VLLMProcess

    cfg = load_config(["topology=cpu_vllm", "model.path=/m", "trainer.lora.rank=4"])
    assert cfg.trainer.weight_sync.path == "auto" and cfg.adapter_path == "disk"
    with_lora = VLLMProcess(cfg.model, cfg.rollout.engine, lora=cfg.trainer.lora)
    argv = with_lora.command("/tmp", {})[0]
    assert argv[argv.index("--max-lora-rank") + 1] == "8" and "--enable-lora" in argv
    assert argv[argv.index("--max-loras") + 1] == "3"
    assert with_lora.environment()["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    plain = VLLMProcess(cfg.model, cfg.rollout.engine)
    assert "--enable-lora" not in plain.command("/tmp", {})[0]
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in plain.environment()
