"""launch/warmstart.py: the cache key, the token layout, and the skip when cached."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from areal_like.settings.config import load_config
from launch.warmstart import _batch, cache_key, cache_path, ensure_warm_start


def test_cache_key_covers_model_task_and_warm_start_but_not_the_run_dir(tmp_path):
    a = load_config(["experiment=quickstart", f"run_dir={tmp_path}/r1"])
    b = load_config(["experiment=quickstart", f"run_dir={tmp_path}/r2"])
    assert cache_key(a) == cache_key(b)
    # next to the run dirs
    assert cache_path(a) == cache_path(b) == tmp_path / "warmstart" / cache_key(a)
    for override in ("task.digits=3", "model.hidden_size=64", "warm_start.steps=7",
                     "warm_start.lr=1e-4"):
        assert cache_key(load_config(["experiment=quickstart", override])) != cache_key(a), override


def test_cache_key_covers_the_saved_format(monkeypatch):
    import launch.warmstart

    cfg = load_config(["experiment=quickstart"])
    before = cache_key(cfg)
    monkeypatch.setattr(launch.warmstart, "CACHE_FORMAT", launch.warmstart.CACHE_FORMAT + 1)
    assert cache_key(cfg) != before  # a cache written before a format change is not reused


def test_batch_puts_loss_on_the_answer_and_eos_only():
    # prompt [1, 10, 11] (bos + 2 chars), answer [20, 2] (1 char + eos);
    # second row shorter and padded
    ids, labels, mask = _batch([([1, 10, 11], [20, 2]), ([1, 10], [21, 2])])
    assert ids.tolist() == [[1, 10, 11, 20, 2], [1, 10, 21, 2, 0]]
    assert labels.tolist() == [[-100, -100, -100, 20, 2], [-100, -100, 21, 2, -100]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]


def test_cached_model_is_reused_without_training(tmp_path):
    cfg = load_config(["experiment=quickstart", f"run_dir={tmp_path}/run"])
    out = cache_path(cfg)
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")  # a finished cache entry
    logs: list[str] = []
    got = ensure_warm_start(cfg, log=logs.append)
    assert got.model.path == str(out) and logs == [f"cached: {out}"]
    assert dataclasses.replace(got, model=cfg.model) == cfg  # nothing else changes
    off = load_config(["experiment=quickstart", "warm_start.steps=0"])
    assert ensure_warm_start(off) is off


def test_pairs_use_the_rollout_servers_prompt_layout():
    from areal_like.tasks.task import encode_prompt, make_task
    from areal_like.tasks.tokenizer import load_tokenizer
    from launch.warmstart import _pairs

    quick = load_config(["experiment=quickstart"])
    tok = load_tokenizer(quick.model)
    task = make_task(quick.task, tok)
    [(prompt, answer)] = _pairs(task, [0], tok)
    ex = task.example(0)
    assert prompt == tok(ex.prompt)["input_ids"] and prompt[0] == 1  # <bos> + characters, as before
    assert tok.decode(answer) == ex.answer + "<eos>" and len(answer) == len(ex.answer) + 1

    shipped = Path(__file__).resolve().parents[2] / "areal_like" / "tasks" / "data"
    data = shipped / "math_chat" / "eval.parquet"
    chat = load_config(["task=dataset", f"task.dataset_path={data}",
                        "task.messages_key=messages", "model.tokenizer=bpe",
                        "model.vocab_size=512"])
    tok = load_tokenizer(chat.model)
    task = make_task(chat.task, tok)
    [(prompt, answer)] = _pairs(task, [3], tok)
    ex = task.example(3)
    assert prompt == encode_prompt(tok, ex, chat.task)
    assert tok.decode(prompt + answer) == (f"<|im_start|>user\n{ex.prompt}<|im_end|>\n"
                                           "<|im_start|>assistant\n"
                                           f"{ex.answer}<|im_end|>")


def test_an_environment_without_demos_is_a_config_error_not_a_traceback(tmp_path):
    """``areal-like run task.env=...`` keeps the tiny model's warm start (150 steps); an environment
    with no ``demo`` to learn from stopped the command with a ValueError's traceback. A ConfigError
    is printed as one ``error:`` line and exits 2 (launch/cli.py)."""
    import pytest

    from areal_like.settings.config import ConfigError

    cfg = load_config(["task.env=agent_envs:Chat", f"run_dir={tmp_path}/run"])  # tests/unit
    with pytest.raises(ConfigError, match="has no demo.*set warm_start.steps=0"):
        ensure_warm_start(cfg, log=lambda m: None)
    assert not (tmp_path / "warmstart").exists()
