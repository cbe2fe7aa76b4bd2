"""The warm start: its cache key (by content), its rows' token layout, the skip when cached."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import pytest

from areal_like.settings.config import ConfigError, load_config
from areal_like.tasks.task import encode_prompt, make_task
from areal_like.tasks.tokenizer import load_tokenizer
from launch.warmstart import cache_key, cache_path, ensure_warm_start
from trainer.sft import chat_pairs, example_pair, pairs_batch, sft_source


def test_cache_key_covers_model_task_and_warm_start_but_not_the_run_dir(tmp_path):
    a = load_config(["experiment=quickstart", f"run_dir={tmp_path}/r1"])
    b = load_config(["experiment=quickstart", f"run_dir={tmp_path}/r2"])
    assert cache_key(a) == cache_key(b)
    # next to the run dirs
    assert cache_path(a) == cache_path(b) == tmp_path / "warmstart" / cache_key(a)
    for override in ("task.digits=3", "model.hidden_size=64", "warm_start.steps=7",
                     "warm_start.lr=1e-4", "trainer.lora.rank=4", "seed=1"):
        assert cache_key(load_config(["experiment=quickstart", override])) != cache_key(a), override
    # what only RL and the evaluation read: `run` reuses what `sft` trained with other RL settings
    for override in ("task.group_size=4", "task.temperature=1.0", "trainer.steps=3",
                     "buffer.groups_per_step=4", "task.max_new_tokens=4",
                     "warm_start.eval_prompts=0"):
        assert cache_key(load_config(["experiment=quickstart", override])) == cache_key(a), override


def test_cache_key_is_the_content_of_model_and_data_not_their_names(tmp_path):
    model, data = tmp_path / "model", tmp_path / "train.jsonl"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')

    def key(m: Path, d: Path, *more: str) -> str:
        return cache_key(load_config(["model=local_hf", f"model.path={m}", "task=dataset",
                                      f"task.dataset_path={d}", "warm_start.steps=5", *more]))

    first = key(model, data)
    shutil.copytree(model, tmp_path / "moved")
    shutil.copy(data, tmp_path / "renamed.jsonl")
    assert key(tmp_path / "moved", tmp_path / "renamed.jsonl") == first  # same bytes, same key
    (model / "model.safetensors").write_bytes(b"weights, fine-tuned")
    assert key(model, data) != first
    (model / "model.safetensors").write_bytes(b"weights")
    data.write_text('{"prompt": "1+1=", "answer": "3"}\n')
    assert key(model, data) != first
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    assert key(model, data) == first
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"messages": []}\n')
    with_chat = key(model, data, f"warm_start.dataset_path={chat}")
    chat.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert key(model, data, f"warm_start.dataset_path={chat}") not in (first, with_chat)


def test_cache_key_follows_the_environment_module_s_code(tmp_path, monkeypatch):
    """A taskset's code writes its demo conversations: an edit to it is a new warm start."""
    module = tmp_path / "my_env.py"
    module.write_text("class Env: pass\n")
    monkeypatch.syspath_prepend(tmp_path)

    def key() -> str:
        return cache_key(load_config(["task=calc", "task.env=my_env:Env"]))

    first = key()
    module.write_text("class Env: demo_share = 0.25\n")
    assert key() != first
    module.write_text("class Env: pass\n")
    assert key() == first


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


def test_batch_puts_the_loss_on_the_target_and_eos_only():
    # prompt [1, 10, 11] (bos + 2 chars), target [20, 2] (1 char + eos);
    # second row shorter and padded
    b = pairs_batch([([1, 10, 11], [20, 2]), ([1, 10], [21, 22, 2])])
    assert b.input_ids.tolist() == [[1, 10, 11, 20, 2], [1, 10, 21, 22, 2]]
    assert b.prompt_lens.tolist() == [3, 2] and b.output_lens.tolist() == [2, 3]
    assert b.mask.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_pairs_use_the_rollout_servers_prompt_layout():
    quick = load_config(["experiment=quickstart"])
    tok = load_tokenizer(quick.model)
    task = make_task(quick.task, tok)
    prompt, answer = example_pair(tok, task.example(0), quick.task)
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
    ex = task.example(3)
    prompt, answer = example_pair(tok, ex, chat.task)
    assert prompt == encode_prompt(tok, ex, chat.task)
    assert tok.decode(prompt + answer) == (f"<|im_start|>user\n{ex.prompt}<|im_end|>\n"
                                           "<|im_start|>assistant\n"
                                           f"{ex.answer}<|im_end|>")


def test_chat_rows_train_every_assistant_message_in_its_context(tmp_path):
    """One pair per assistant message: its context through the chat template, its content + EOS."""
    rows = [{"messages": [{"role": "system", "content": "Add."},
                          {"role": "user", "content": "1+2="},
                          {"role": "assistant", "content": "3"},
                          {"role": "user", "content": "and 4+4="},
                          {"role": "assistant", "content": "8"}]}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(["model.tokenizer=bpe", "model.vocab_size=512", "warm_start.steps=1",
                       f"warm_start.dataset_path={path}"])
    tok = load_tokenizer(cfg.model)
    n, pairs_of = sft_source(cfg, tok)
    pairs = pairs_of(0, random.Random(0))
    assert n == 1 and len(pairs) == 2
    assert pairs == chat_pairs(rows[0]["messages"], tok, tok.chat_template)
    (p1, t1), (p2, t2) = pairs
    assert tok.decode(t1) == "3<|im_end|>" and tok.decode(t2) == "8<|im_end|>"
    assert tok.decode(p1).endswith("<|im_start|>user\n1+2=<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(p2).endswith("and 4+4=<|im_end|>\n<|im_start|>assistant\n")
    assert p2[:len(p1)] == p1  # the second turn sees the first, answered

    # the task's prompt/answer columns work from warm_start.dataset_path too
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"prompt": "2+2=", "answer": "4"}\n')
    cfg = load_config([f"warm_start.dataset_path={plain}", "warm_start.steps=1"])
    tok = load_tokenizer(cfg.model)
    n, pairs_of = sft_source(cfg, tok)
    [(prompt, target)] = pairs_of(0, random.Random(0))
    assert n == 1 and tok.decode(prompt + target) == "<bos>2+2=4<eos>"

    # a chat row without an assistant answer is refused, naming the key
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ConfigError, match="warm_start.dataset_path=.*row 0"):
        sft_source(load_config(["model.tokenizer=bpe", "model.vocab_size=512",
                                f"warm_start.dataset_path={path}"]), tok)


def test_an_environment_without_demos_is_a_config_error_not_a_traceback(tmp_path, monkeypatch):
    """An environment with no ``demo`` for the tiny model's warm start: a ConfigError."""
    monkeypatch.chdir(Path(__file__).parent)  # tests/unit: agent_envs.py
    cfg = load_config(["task.env=agent_envs:Chat", f"run_dir={tmp_path}/run"])
    with pytest.raises(ConfigError, match="has no demo.*set warm_start.steps=0"):
        ensure_warm_start(cfg, log=lambda m: None)
    assert not (tmp_path / "warmstart").exists()
