"""resolve_model_path against a real HF cache layout in tmp_path, in a child Python, offline."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from areal_like.settings.config import ConfigError, ModelConfig, load_config
from areal_like.weights.hf import looks_like_hub_id, resolve_model_path, resolve_models

ROOT = Path(__file__).resolve().parents[2]
# not a real repository: a lookup that reached the hub would fail
REPO = "areal-like-test/tiny-cached"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(home: Path, repo: str = REPO, weights: bool = True, tokenizer: bool = False) -> Path:
    """An HF_HOME caching repo at refs/main (without weights: config/tokenizer only)."""
    entry = home / "hub" / f"models--{repo.replace('/', '--')}"
    snap = entry / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (snap / "config.json").write_text('{"model_type": "qwen2", "vocab_size": 160}')
    if weights:
        (snap / "model.safetensors").write_bytes(b"")
    if tokenizer:
        (snap / "tokenizer_config.json").write_text("{}")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(COMMIT)
    return snap


def run_py(code: str, home: Path, offline: bool, *args: str, cwd: Path | None = None,
           endpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(home), "PYTHONPATH": str(ROOT)}
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_HUB_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, timeout=120, cwd=cwd)


ONE_LINE = ("import sys\nfrom areal_like.settings.config import ConfigError\n"
            "from areal_like.weights.hf import resolve_model_path\n"
            "for path in sys.argv[1:]:\n    try:\n        print(resolve_model_path(path))\n"
            "    except ConfigError as e:\n        print('error:', e)\n")
CLI = "import sys; from launch.cli import main; sys.exit(main(sys.argv[1:]))"


def test_a_home_relative_path_is_read_and_resolved_expanded(tmp_path, monkeypatch):
    from areal_like.job_facts import model_json
    from launch.preflight import check_tp_size

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(
        '{"vocab_size": 77, "num_attention_heads": 6, "num_key_value_heads": 2}')
    cfg = load_config(["model.path='~/m'", "rollout.engine.kind=sglang",
                       "rollout.engine.tp_size=4"])
    assert model_json(cfg.model, "vocab_size") == 77
    assert "6 attention heads" in check_tp_size(cfg)[0]  # read from ~/m, not the tiny model's
    assert resolve_models(cfg).model.path == str(tmp_path / "m")


def test_hub_id_is_found_in_the_local_cache_without_the_network_or_named_in_one_line(tmp_path):
    snap = fake_cache(tmp_path / "hf")
    # HF_HUB_OFFLINE unset: the cache is looked at first, so a cached model never reaches the net
    r = run_py(ONE_LINE, tmp_path / "hf", False, REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(snap)
    r = run_py(ONE_LINE, tmp_path / "hf", True, "areal-like-test/not-cached", "models/mine",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    missing, relative = r.stdout.splitlines()
    assert missing.startswith(
        "error: model.path='areal-like-test/not-cached' is not a local directory")
    assert "HF_HUB_OFFLINE" in missing and str(tmp_path / "hf" / "hub") in missing
    # a relative path that is not here says where it was looked for
    assert relative.startswith(f"error: model.path='models/mine' is not a local directory at "
                               f"{tmp_path / 'models' / 'mine'} and not in the Hugging Face "
                               "cache"), relative


def test_a_cache_without_weights_is_incomplete_offline(tmp_path):
    # AutoTokenizer.from_pretrained cached these
    snap = fake_cache(tmp_path / "hf", weights=False, tokenizer=True)
    r = run_py(ONE_LINE, tmp_path / "hf", True, REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout == (f"error: model.path={REPO!r} is in the Hugging Face cache incompletely "
                        f"({snap} has no *.safetensors or *.bin), and HF_HUB_OFFLINE is set "
                        "(unset it to download, or give a local "
                        "directory)\n")
    # the same snapshot is complete for model.tokenizer, which needs tokenizer files, not weights
    code = ("from areal_like.settings.config import load_config\n"
            "from areal_like.weights.hf import resolve_models\n"
            f"print(resolve_models(load_config(['model.tokenizer={REPO}'])).model.tokenizer)\n")
    r = run_py(code, tmp_path / "hf", True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(snap)


def test_a_cache_without_weights_is_completed_by_a_download(tmp_path):
    snap = fake_cache(tmp_path / "hf", weights=False)
    with socket.socket() as s:  # a port nothing listens on: the "Hub" refuses the connection
        s.bind(("127.0.0.1", 0))
        hub = f"http://127.0.0.1:{s.getsockname()[1]}"
    r = run_py(ONE_LINE, tmp_path / "hf", False, REPO, endpoint=hub)
    assert r.returncode == 0, r.stderr
    # it went for the download (not returned the partial snapshot), which fell back to that snapshot
    assert r.stdout == (f"error: model.path={REPO!r}: {snap} has no *.safetensors or *.bin "
                        "after the download "
                        "(the Hub unreachable, or the repository has none)\n")


def test_areal_like_config_prints_the_resolved_directories_absolute(tmp_path):
    snap = fake_cache(tmp_path / "hf", tokenizer=True)
    shutil.copytree(snap, tmp_path / "work" / "m")
    r = run_py(CLI, tmp_path / "hf", True, "config", "model=local_hf", "model.path=m",
               f"model.tokenizer={REPO}", "trainer.ref_path=./m", cwd=tmp_path / "work")
    assert r.returncode == 0, r.stderr
    for key, where in (("path", tmp_path / "work" / "m"), ("tokenizer", snap),
                       ("ref_path", tmp_path / "work" / "m")):
        assert f"  {key}: {where}\n" in r.stdout, key
    r = run_py(CLI, tmp_path / "hf", True, "config", "model=local_hf",
               "model.path=areal-like-test/not-cached", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1  # no traceback
    assert r.stderr.startswith(
        "error: model.path='areal-like-test/not-cached' is not a local directory")


def test_a_directory_is_used_as_is_and_neither_a_directory_nor_a_hub_id_is_refused(tmp_path,
                                                                                   monkeypatch):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ConfigError,
                       match=r"^model\.path='/no/such/dir' does not exist \(and is not a hub id"):
        resolve_model_path("/no/such/dir")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError,
                       match=r"^trainer\.ref_path=.* is a file, not a model directory"):
        resolve_model_path(str(tmp_path / "f"), key="trainer.ref_path")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        resolve_model_path("mine")
    assert str(e.value) == (f"model.path='mine' does not exist at {tmp_path / 'mine'} (and is "
                            "not a hub id of the form org/name)")


@pytest.mark.parametrize("text,expected", [
    ("Qwen/Qwen2.5-0.5B-Instruct", True), ("org/name", True), ("gpt2", False), ("/abs/path", False),
    ("./rel/dir", False), ("a/b/c", False), ("org/--x", False), ("org/a..b", False),
    ("~/models/x", False),
])
def test_hub_id_shape(text, expected):
    assert looks_like_hub_id(text) is expected


def test_resolve_models_resolves_every_model_key_and_leaves_the_input_alone(tmp_path):
    model, tok, ref = (tmp_path / n for n in ("model", "tok", "ref"))
    for d in (model, tok, ref):
        d.mkdir()
    cfg = load_config([f"model.path={model}", f"model.tokenizer={tok}", f"trainer.ref_path={ref}"])
    assert resolve_models(cfg) == cfg  # local directories: as is
    built = load_config([])
    # a model built from config, the char tokenizer: nothing to resolve
    assert resolve_models(built) == built
    bad = load_config(["model.tokenizer=/no/tok"])
    with pytest.raises(ConfigError, match=r"^model\.tokenizer='/no/tok' does not exist"):
        resolve_models(bad)


def test_loading_a_saved_model_draws_no_progress_bar_and_leaves_the_setting_alone(tmp_path,
                                                                                   capfd):
    from transformers.utils import logging as hf_logging

    from areal_like.weights.hf import build_model

    build_model(ModelConfig(max_position_embeddings=64)).save_pretrained(tmp_path / "m")
    capfd.readouterr()
    assert hf_logging.is_progress_bar_enabled()
    build_model(ModelConfig(path=str(tmp_path / "m"), max_position_embeddings=64))
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # the process's other bars are not ours to hide


@pytest.mark.parametrize("family,asked,used", [("gpt_oss", "sdpa", "eager"),
                                                ("qwen2", "sdpa", "sdpa"),
                                                ("gpt_oss", "flex_attention", "flex_attention")])
def test_a_checkpoint_as_published_starts_with_an_attention_its_family_has(tmp_path, family,
                                                                          asked, used):
    from areal_like.weights.hf import build_model
    from tests.families import save_family

    save_family(family, tmp_path)
    model = build_model(ModelConfig(path=str(tmp_path), attn_implementation=asked))
    assert model.config._attn_implementation == used
