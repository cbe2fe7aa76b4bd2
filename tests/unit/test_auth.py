"""Job credentials: the per-job engine API key (made once, owner-only, handed to the daemons by
environment, never in config.yaml), redaction of config output and logged command lines, and the
refusal of credentials in config."""

from __future__ import annotations

import os
import stat

import pytest
import yaml

from areal_like.net.auth import (
    BIND_HOST_ENV,
    ENGINE_KEY_ENV,
    KEY_FILE,
    REWARD_AUTH_ENV,
    ensure_key_file,
    redact,
    redact_argv,
)
from areal_like.net.security import SecurityError
from areal_like.settings.config import ConfigError, ModelConfig, TaskConfig, load_config
from areal_like.settings.schema import EngineConfig
from launch.job import job_specs, prepare
from rollout_server.launch_sglang import sglang_command, write_secrets
from tests.conftest import run_cli


def test_the_key_file_is_made_once_and_readable_by_its_owner_only(tmp_path):
    key = ensure_key_file(tmp_path)
    path = tmp_path / KEY_FILE
    assert len(key) >= 40 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert ensure_key_file(tmp_path) == key  # a resumed run keeps its key
    assert ensure_key_file(tmp_path / "other") != key  # another job, another key


def test_a_local_job_hands_its_key_to_every_daemon_and_never_writes_it_into_config(
        tmp_path, monkeypatch):
    monkeypatch.delenv(ENGINE_KEY_ENV, raising=False)
    monkeypatch.delenv(BIND_HOST_ENV, raising=False)
    cfg = load_config([f"run_dir={tmp_path / 'run'}", "launch.num_rollout_servers=2",
                       "launch.trainer_ranks=1"])
    cfg, topo, config_path = prepare(cfg)
    key = (tmp_path / "run" / KEY_FILE).read_text().strip()
    specs = job_specs(cfg, topo, config_path, python="py")
    assert {s.env[ENGINE_KEY_ENV] for s in specs} == {key} and len(specs) == 4
    # /metrics on loopback for a local job
    assert {s.env[BIND_HOST_ENV] for s in specs} == {"127.0.0.1"}
    assert (key not in config_path.read_text()
            and key not in " ".join(str(a) for s in specs
                                    for a in (s.argv if isinstance(s.argv, list) else s.argv())))
    monkeypatch.setenv(ENGINE_KEY_ENV, "exported-by-the-user")  # e.g. an attached SGLang's key wins
    assert ({s.env[ENGINE_KEY_ENV] for s in job_specs(cfg, topo, config_path, python="py")}
            == {"exported-by-the-user"})


def test_a_job_whose_key_file_others_may_read_is_refused_before_config_yaml(tmp_path,
                                                                            monkeypatch):
    """``areal-like run`` (``prepare``) keeps a run's engine API key: one that others may read is
    refused (SecurityError, printed as one ``error:`` line) before config.yaml is written."""
    monkeypatch.delenv(ENGINE_KEY_ENV, raising=False)
    ensure_key_file(tmp_path / "run")
    (tmp_path / "run" / KEY_FILE).chmod(0o644)
    cfg = load_config([f"run_dir={tmp_path / 'run'}", "launch.num_rollout_servers=1",
                       "launch.trainer_ranks=1"])
    with pytest.raises(SecurityError, match=f"chmod 600 {tmp_path / 'run' / KEY_FILE}"):
        prepare(cfg)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_credentials_are_refused_in_config():
    with pytest.raises(ConfigError, match=f"rollout.engine.sglang.api_key: credentials are not "
                                          f"configuration.*{ENGINE_KEY_ENV}"):
        EngineConfig(kind="sglang", sglang={"api_key": "x"})
    # not credentials
    EngineConfig(kind="sglang", sglang={"max_prefill_tokens": 4096, "kv_cache_dtype": "auto"})


def test_redaction_keeps_what_is_not_a_credential():
    got = redact({"task": {"reward_url": "https://bot:hunter2@rewards.example/score",
                           "prompt_key": "q", "max_new_tokens": 16},
                  "hf_token": "hf_x", "x": [{"api_key": "k"}], "empty_token": ""})
    assert got == {"task": {"reward_url": "https://bot:<redacted>@rewards.example/score",
                            "prompt_key": "q", "max_new_tokens": 16},
                   "hf_token": "<redacted>", "x": [{"api_key": "<redacted>"}],
                   "empty_token": ""}
    assert redact_argv(["sglang", "--api-key", "K", "--port", "1", "--admin-api-key=Z"]) == [
        "sglang", "--api-key", "<redacted>", "--port", "1", "--admin-api-key=<redacted>"]


def test_sglang_gets_the_key_in_an_owner_only_file_never_on_its_command_line(tmp_path):
    path = write_secrets(str(tmp_path), "K:#")
    argv = sglang_command(ModelConfig(path="/m"), EngineConfig(kind="sglang"), 30000, path)
    assert argv[argv.index("--config") + 1] == path and "K:#" not in " ".join(argv)
    assert yaml.safe_load(open(path)) == {"api-key": "K:#"}
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert "--config" not in sglang_command(ModelConfig(path="/m"), EngineConfig(kind="sglang"),
                                            30000)
    with pytest.raises(ValueError, match="starts with '-'"):  # SGLang would take it for a flag
        write_secrets(str(tmp_path / "other"), "-K")
    assert not ensure_key_file(tmp_path).startswith("-")


def test_a_credential_in_the_reward_url_is_refused_before_any_file_is_written(tmp_path):
    """``task.reward_url`` with a user:password or a token query parameter reached config.yaml,
    exports and the trackers (``dataclasses.asdict`` of the config); now it is refused by name,
    before anything is written, and the credential goes in ``REWARD_AUTH_ENV``."""
    for url in ("https://bot:hunter2@rewards.example/score",
                "https://rewards.example/score?token=hunter2"):
        r = run_cli("config", f"run_dir={tmp_path}", "warm_start.steps=0",
                    f"task.reward_url='{url}'", cwd=tmp_path, timeout=300)
        assert r.returncode == 2, (url, r.stdout[-500:])
        assert "task.reward_url: credentials are not configuration" in r.stderr, r.stderr
        assert REWARD_AUTH_ENV in r.stderr and "hunter2" not in r.stdout + r.stderr
        assert not any("hunter2" in f.read_text(errors="replace")
                       for f in tmp_path.rglob("*") if f.is_file())
    TaskConfig(reward_url="https://rewards.example/score?batch=8")  # not a credential


