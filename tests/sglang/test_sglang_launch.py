"""Launch through the rollout server's path (``SGLangProcess``, cpu_sglang's flags): health,
the API key, flags passed through, a flag SGLang does not know refused naming it, the
refusal of an SGLang release the stand-in was not checked against. The engine's TMPDIR of its own,
gone after stop (SGLang left its IPC sockets in the shared temporary directory, ~25 a tier run), is
checked (``sglang_kit.own_tmpdir``) on the server test_sglang_logprob_guard.py starts and stops
anyway: a server of its own here cost the tier one more SGLang start (~30-130 s)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from sglang_kit import cpu_engine, model_config

from rollout_server.launch_sglang import SGLangProcess


def _get(url: str, key: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(url: str, body: dict, key: str | None = None) -> int:
    headers = {
        "Content-Type": "application/json",
        **({"Authorization": f"Bearer {key}"} if key else {}),
    }
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_every_call_but_health_needs_the_api_key(sglang_server):
    url, key = sglang_server.url, sglang_server.api_key
    generate = {"input_ids": [1, 20, 21], "sampling_params": {"max_new_tokens": 2}}
    assert _post(url + "/generate", generate) == 401
    assert _post(url + "/generate", generate, "wrong-key") == 401
    assert _post(url + "/generate", generate, key) == 200
    assert _get(url + "/model_info")[0] == 401
    assert _post(url + "/update_weights_from_disk", {"model_path": "/nonexistent"}) == 401
    assert _post(url + "/pause_generation", {"mode": "abort"}) == 401
    # SGLang leaves health and readiness open on purpose (probes need no secret;
    # sglang/srt/utils/auth.py)
    assert _get(url + "/health_generate")[0] == 200


def test_flags_reach_sglang(sglang_server):
    status, body = _get(sglang_server.url + "/server_info", sglang_server.api_key)
    assert status == 200
    info = json.loads(body)
    engine = cpu_engine()
    assert (
        info["device"] == "cpu"
        and info["attention_backend"] == "torch_native"
        and info["dtype"] == "float32"
    )
    assert info["max_total_tokens"] == engine.sglang["max_total_tokens"]
    assert info["skip_server_warmup"] is True and info["disable_overlap_schedule"] is True
    assert info["tp_size"] == 1 and info["model_path"] == str(sglang_server.model_dir)
    assert info["version"] == "0.5.23"
    _, body = _get(sglang_server.url + "/model_info", sglang_server.api_key)
    # --weight-version 0 at launch, integers from then on (other tests push versions meanwhile)
    assert json.loads(body)["weight_version"].isdigit()


def test_another_sglang_release_is_refused_before_anything_starts(monkeypatch, tmp_path):
    import rollout_server.launch_sglang as launch

    monkeypatch.setattr(launch, "installed_sglang", lambda: "0.5.22")
    proc = SGLangProcess(model_config(tmp_path), cpu_engine(), log_path=str(tmp_path / "log"))
    with pytest.raises(RuntimeError, match=r"needs sglang==0\.5\.23.*0\.5\.22 is installed"):
        proc.start()
    assert proc.proc is None  # nothing was launched


def test_a_misspelled_pass_through_flag_is_refused_naming_it(model_dir, tmp_path):
    """SGLang's argument parser exits 2 naming the flag in its log; the rollout server's error
    says so (one line, exit 2: the settings are wrong, a restart would not help)."""
    from areal_like.daemon import StartRefused

    engine = cpu_engine(max_totl_tokens=100)  # rollout.engine.sglang.max_totl_tokens=100
    proc = SGLangProcess(model_config(model_dir), engine,
                         log_path=str(tmp_path / "sglang.log"))
    with pytest.raises(StartRefused, match=r"code 2 .*unrecognized arguments: --max-totl-tokens"):
        proc.start()
    assert proc.exit_code() == 2


@pytest.mark.parametrize("key", ["Zk3_a-9", "plainKey-_", "a: b #c", "12e5"])
def test_sglang_reads_every_api_key_from_its_config_file_never_from_argv(key, tmp_path):
    """The key goes in SGLang's ``--config`` YAML file, not on its command line (which every
    local user reads with ``ps``): SGLang's own argument parsing reads it back exactly, also a
    key YAML would read as something else (a mapping, a comment, a number)."""
    from sglang.srt.server_args import prepare_server_args

    from rollout_server.launch_sglang import sglang_command, write_secrets

    argv = sglang_command(model_config("/m"), cpu_engine(), 30000,
                          write_secrets(str(tmp_path), key))
    assert prepare_server_args(argv[3:]).api_key == key  # after `python -m sglang.launch_server`
    assert key not in " ".join(argv) and "--api-key" not in argv
