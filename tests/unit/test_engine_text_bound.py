"""A ``/generate`` text too long for the context is refused with 400 before it is tokenized, over a
real socket to an embedded engine with the default HTTP limits (a 10 MB body is within its 64 MiB
cap, so the body cap alone would let it through), and the engine serves the next request."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import torch

from areal_like.settings.config import EngineConfig, ModelConfig
from areal_like.tasks.tokenizer import load_tokenizer
from rollout_server.engine import EmbeddedEngine
from rollout_server.engine.api import max_text_chars

HTTP_TIMEOUT_S = 120.0
CONTEXT = 128


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_bound_is_what_the_longest_tokens_could_cover():
    model = ModelConfig(max_position_embeddings=CONTEXT)
    tokenizer = load_tokenizer(model)
    longest = max(tokenizer.get_vocab(), key=len)
    bound = max_text_chars(tokenizer, CONTEXT)
    assert bound == CONTEXT * len(longest) < 10 * 1024 * 1024
    # the tightest text that could still fit (context - 1 of the longest entry) is never refused
    assert len(longest * (CONTEXT - 1)) < bound


def test_a_10mb_text_is_refused_before_tokenizing_and_the_engine_serves_on():
    torch.set_num_threads(1)
    model = ModelConfig(max_position_embeddings=CONTEXT)
    tokenizer = load_tokenizer(model)
    calls = []
    encode = tokenizer.encode
    tokenizer.encode = lambda text, *a, **k: (calls.append(len(text)), encode(text, *a, **k))[1]
    engine = EmbeddedEngine(model, EngineConfig(max_running_requests=2),
                            tokenizer=tokenizer).start()
    try:
        calls.clear()  # the warm-up
        status, body = post(engine.url, {"text": "7" * (10 * 1024 * 1024),
                                         "sampling_params": {"max_new_tokens": 2}})
        assert status == 400, body
        assert ("(10485760 characters) is longer than the model's context length (128 tokens)"
                in body["error"]["message"])
        assert calls == []  # refused before the tokenizer saw it
        # one of a batch
        status, body = post(engine.url, {"text": ["1+1=", "7" * (10 * 1024 * 1024)]})
        assert status == 400 and calls == []
        status, body = post(engine.url, {"text": "1+1=", "sampling_params": {"max_new_tokens": 2}})
        assert status == 200 and len(body["output_ids"]) == 2 and calls == [4]
    finally:
        engine.stop()
