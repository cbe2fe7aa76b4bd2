"""How a dataset row becomes prompt ids, TRL's convention: with task.chat_template=auto plain
text gets the tokenizer's special tokens and messages its chat template (the char tokenizer's
encoding adds <bos>, its template does not)."""

from __future__ import annotations

import json
import logging

from areal_like.net.distributed import free_port
from areal_like.settings.config import BufferConfig, RunConfig, TaskConfig
from areal_like.tasks.task import SYNTHETIC, encode_prompt, make_task, prompt_layout
from areal_like.tasks.tokenizer import BOS_ID, bpe_tokenizer, char_tokenizer
from buffer.service import BufferService

BRACKETS = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")
QUESTIONS = [("What is 2 + 3?", "5"), ("What is 10 + 7?", "17"), ("What is 4 + 4?", "8")]


def plain_rows(tmp_path):
    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in QUESTIONS))
    return path


def chat_rows(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}], "answer": a} for q, a in QUESTIONS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dataset(path, **kw) -> TaskConfig:
    return TaskConfig(name="dataset", dataset_path=str(path), **kw)


def test_auto_gives_a_plain_prompt_the_tokenizers_bos_and_a_chat_row_the_template(tmp_path):
    tok = char_tokenizer()
    text = QUESTIONS[0][0]
    body = tok(text, add_special_tokens=False)["input_ids"]
    # the premise: encoding adds <bos>, the chat template does not emit it
    assert tok(text)["input_ids"] == [BOS_ID, *body]
    one = [{"role": "user", "content": text}]
    assert BOS_ID not in tok.apply_chat_template(one, add_generation_prompt=True, return_dict=False)

    plain = dataset(plain_rows(tmp_path))
    ex = make_task(plain).example(0)
    assert ex.messages is None
    assert encode_prompt(tok, ex, plain) == [BOS_ID, *body]  # as in the model's plain use

    chat = dataset(chat_rows(tmp_path), messages_key="messages")
    row = make_task(chat).example(0)
    ids = encode_prompt(tok, row, chat)
    assert ids == tok.apply_chat_template(list(row.messages), add_generation_prompt=True,
                                          return_dict=False)
    assert tok.decode(ids) == f"user: {text}\nassistant: " and ids[0] != BOS_ID

    bpe = bpe_tokenizer(512)  # a tokenizer that adds no BOS (as Qwen2's): the text's ids alone
    assert encode_prompt(bpe, ex, plain) == bpe(text, add_special_tokens=False)["input_ids"]


def test_a_template_of_ones_own_applies_to_both_and_none_to_neither(tmp_path):
    tok = char_tokenizer()
    text = QUESTIONS[0][0]
    bracketed = tok(f"[user] {text}\n[assistant] ", add_special_tokens=False)["input_ids"]
    chat = {"messages_key": "messages"}
    for path, kw in ((plain_rows(tmp_path), {}), (chat_rows(tmp_path), chat)):
        own = dataset(path, chat_template=BRACKETS, **kw)
        assert encode_prompt(tok, make_task(own).example(0), own) == bracketed
        none = dataset(path, chat_template="none", **kw)
        assert encode_prompt(tok, make_task(none).example(0), none) == tok(text)["input_ids"]
    # none on a chat row: the messages' contents, one per line, as plain text
    two = tmp_path / "two.jsonl"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    two.write_text(json.dumps({"messages": messages, "answer": "5"}) + "\n")
    none = dataset(two, messages_key="messages", chat_template="none")
    ids = encode_prompt(tok, make_task(none).example(0), none)
    assert ids == tok(f"Be brief.\n{text}")["input_ids"]
    # a row's own system message wins over task.system_prompt, as on the template path
    told = dataset(two, messages_key="messages", chat_template="none", system_prompt="Be long.")
    assert encode_prompt(tok, make_task(told).example(0), told) == ids


def test_synthetic_prompts_keep_their_ids():
    # the quickstart's layout: <bos> + one id per character, never the tokenizer's template (the
    # char tokenizer has one: dataset tasks use it)
    tok = char_tokenizer()
    assert tok.chat_template
    for name in SYNTHETIC:
        for template in ("auto", "none"):
            cfg = TaskConfig(name=name, chat_template=template)
            ex = make_task(cfg).example(3)
            chars = tok(ex.prompt, add_special_tokens=False)["input_ids"]
            assert encode_prompt(tok, ex, cfg) == [BOS_ID, *chars] and len(chars) == len(ex.prompt)


def test_prompt_layout_says_which_encoding(tmp_path):
    plain = "task: prompts are plain text with the tokenizer's special tokens"
    assert prompt_layout(dataset("d.jsonl")) == f"{plain} (column prompt, task.chat_template=auto)"
    assert prompt_layout(TaskConfig(name="addition")) == (
        f"{plain} (synthetic task addition, task.chat_template=auto)")
    assert prompt_layout(dataset("d.jsonl", messages_key="messages")) == (
        "task: prompts go through the tokenizer's chat template "
        "(column messages, task.chat_template=auto)")
    assert prompt_layout(dataset("d.jsonl", messages_key="messages", chat_template="none")) == (
        f"{plain}, the messages' contents one per line (column messages, task.chat_template=none)")
    own = dataset("d.jsonl", prompt_key="q", chat_template=BRACKETS, system_prompt="Hi")
    assert prompt_layout(own) == (
        "task: prompts go through task.chat_template's template, each prompt as one user message, "
        "task.system_prompt first (column q, task.chat_template=a template)")
    assert prompt_layout(dataset("d.jsonl", chat_template="t.jinja")) == (
        "task: prompts go through the template in t.jinja, each prompt as one user message "
        "(column prompt, task.chat_template=a file)")
    assert prompt_layout(TaskConfig(name="guess", env="pkg.mod:Env")) == (
        "task: episodes are conversations through the tokenizer's chat template "
        "(task.env)")


def test_the_buffer_logs_the_layout_once_at_start(tmp_path, caplog):
    buf = BufferConfig(address=f"tcp://127.0.0.1:{free_port()}",
                       pub_address=f"tcp://127.0.0.1:{free_port()}")
    cfg = RunConfig(run_dir=str(tmp_path / "run"), buffer=buf, task=dataset(plain_rows(tmp_path)))
    svc = BufferService.from_run(cfg)
    try:
        with caplog.at_level(logging.INFO, logger="buffer"):
            svc.start()
    finally:
        svc.stop()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("task: ")]
    assert lines == ["task: prompts are plain text with the tokenizer's special tokens "
                     "(column prompt, task.chat_template=auto); 3 prompts per epoch"]
