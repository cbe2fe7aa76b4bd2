"""The embedded engine returns each token's experts (SGLang's base64 int32 routed_experts) and a
trainer replaying them reproduces the engine's log-probs (a dense model's engine refuses:
test_engine_http.py's table of malformed requests)."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest
import torch

from areal_like.settings.config import EngineConfig, ModelConfig
from areal_like.weights.hf import build_model
from areal_like.weights.routing import recording, replaying
from rollout_server.engine.embedded import EmbeddedEngine
from tests.families import save_family

PROMPTS = [[1, 5, 9, 30, 41], [1, 60, 7], [1, 22, 23, 24, 25, 26, 27, 28, 29]]


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    d = save_family("qwen3_moe", tmp_path_factory.mktemp("moe"))
    cfg = ModelConfig(path=str(d), attn_implementation="sdpa")
    engine = EmbeddedEngine(cfg, EngineConfig(max_running_requests=2)).start()
    yield engine, build_model(cfg).eval()
    engine.stop()


def generate(engine, **extra) -> list[dict]:
    body = {"input_ids": PROMPTS, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 12, "ignore_eos": True, "sampling_seed": 3},
            **extra}
    status, out = asyncio.run(engine.generate_local(body))
    assert status == 200, out
    return out


def routes_of(out: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(out["meta_info"]["routed_experts"]), "<i4")


def test_the_engine_returns_the_routes_its_forwards_took_and_replay_reproduces_them(moe):
    engine, model = moe
    outs = generate(engine, return_routed_experts=True)  # 3 prompts over 2 slots: prefill twice
    for p, out in zip(PROMPTS, outs):
        seq = p + out["output_ids"]
        routes = torch.from_numpy(routes_of(out).reshape(len(seq) - 1, 2, 2).copy())
        ids = torch.tensor([seq[:-1]])
        with torch.no_grad(), recording(model) as seen:
            free = model(input_ids=ids).logits[0].float().log_softmax(-1)
        assert torch.equal(seen[0], routes)  # a whole-sequence forward routes as the engine did
        with torch.no_grad(), replaying(model, routes):
            replayed = model(input_ids=ids).logits[0].float().log_softmax(-1)
        torch.testing.assert_close(replayed, free, rtol=0, atol=0)
        engine_lp = torch.tensor([lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]])
        picked = replayed[len(p) - 1:].gather(1, torch.tensor(out["output_ids"])[:, None])[:, 0]
        assert (picked - engine_lp).abs().max() <= 1e-5
    assert "routed_experts" not in generate(engine)[0]["meta_info"]  # only when asked

