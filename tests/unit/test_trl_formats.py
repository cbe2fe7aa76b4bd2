"""TRL's dataset formats through ``make_task`` and ``encode_prompt``: standard rows are plain
text, conversational ones go through the chat template; ambiguous data is refused naming the key
(the preflight's refusal through ``areal-like run``: tests/integration/test_trl_data_job.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from test_datasets import write

from areal_like.settings.config import ConfigError, TaskConfig
from areal_like.tasks.task import Example, encode_prompt, make_task, prompt_layout
from areal_like.tasks.tokenizer import char_tokenizer
from tests.conftest import run_cli

SUMS = [(12, 34), (90, 11), (5, 7)]
CONVERSATIONAL = [{"prompt": [{"role": "user", "content": f"{a}+{b}="}], "answer": str(a + b)}
                  for a, b in SUMS]
MESSAGES = [{"messages": r["prompt"], "answer": r["answer"]} for r in CONVERSATIONAL]
STANDARD = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in SUMS]


def dataset(path: Path, **kw) -> TaskConfig:
    return TaskConfig(name="dataset", dataset_path=str(path), **kw)


def rendered(messages: list[dict]) -> list[int]:
    """What the char tokenizer's chat template makes of ``messages``, generation prompt added."""
    return [int(t) for t in char_tokenizer().apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "save_to_disk"])
@pytest.mark.parametrize("rows", [CONVERSATIONAL, MESSAGES], ids=["prompt_column", "messages"])
def test_conversational_rows_go_through_the_chat_template(fmt, rows, tmp_path):
    cfg = dataset(write(fmt, tmp_path, rows))
    task = make_task(cfg)
    tok = char_tokenizer()
    for i, (a, b) in enumerate(SUMS):
        ex = task.example(i)
        messages = [{"role": "user", "content": f"{a}+{b}="}]
        assert ex == Example(f"{a}+{b}=", str(a + b), tuple(messages), {})
        ids = encode_prompt(tok, ex, cfg)
        assert ids == rendered(messages)
        assert tok.decode(ids) == f"user: {a}+{b}=\nassistant: "
    column = "prompt" if rows is CONVERSATIONAL else "messages"
    assert prompt_layout(cfg) == (f"task: prompts go through the tokenizer's chat template "
                                  f"(column {column}, task.chat_template=auto)")


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "save_to_disk"])
def test_standard_rows_are_plain_text_and_the_completion_can_be_the_answer(fmt, tmp_path):
    path = write(fmt, tmp_path, STANDARD)
    task = make_task(dataset(path, answer_key="completion"))
    assert [task.example(i) for i in range(3)] == [
        Example(f"{a}+{b}=", str(a + b), None, {}) for a, b in SUMS]
    assert char_tokenizer().decode(encode_prompt(char_tokenizer(), task.example(0),
                                                 dataset(path))) == "<bos>12+34="
    # no answer column at all: the reward of one's own needs none
    bare = make_task(dataset(path, answer_key="", reward_fn="trl_reward_fns:one_short"))
    ex = bare.example(1)  # csv reads the completion 101 as a number
    assert (ex.prompt, ex.answer, str(ex.metadata["completion"])) == ("90+11=", "", "101")


def test_ambiguous_data_is_refused_naming_the_key(tmp_path):
    both = write("jsonl", tmp_path, [{**CONVERSATIONAL[0], "messages": MESSAGES[0]["messages"]}])
    with pytest.raises(ConfigError, match=r"^task.messages_key: .* has both a 'prompt' column and "
                                          r"a 'messages' column"):
        make_task(dataset(both))
    assert make_task(dataset(both, messages_key="messages")).example(0).messages  # told: fine

    (tmp_path / "mixed").mkdir()
    mixed = write("jsonl", tmp_path / "mixed", [STANDARD[0], CONVERSATIONAL[1]])
    with pytest.raises(ConfigError, match=r"^task.prompt_key='prompt': the column mixes text "
                                          r"\(row 0\) and message lists \(row 1\)"):
        make_task(dataset(mixed, answer_key="", reward_fn="m:f"))

    # a CSV cell cannot hold a list: the messages' text would reach the model as a prompt
    text = write("csv", tmp_path, [{"prompt": json.dumps(r["prompt"]), "answer": r["answer"]}
                                   for r in CONVERSATIONAL])
    with pytest.raises(ConfigError, match=r"^task.prompt_key='prompt': row 0 of .*d.csv is chat "
                                          r"messages written as text"):
        make_task(dataset(text))

    (tmp_path / "one").mkdir()  # one message, not a list of them
    one = write("jsonl", tmp_path / "one", [{"prompt": r["prompt"][0], "answer": r["answer"]}
                                            for r in CONVERSATIONAL])
    with pytest.raises(ConfigError, match=r"^task.prompt_key='prompt': row 0 of .* is neither text "
                                          r"nor a list of \{role, content\} messages"):
        make_task(dataset(one))

    with pytest.raises(ConfigError, match=r"^task.answer_key='answer': no such column in .*; "
                                          r"columns found: prompt, completion; task.answer_key='' "
                                          r"when the reward \(task.reward_fn\) needs no answer"):
        make_task(dataset(write("parquet", tmp_path, STANDARD)))
    with pytest.raises(ConfigError, match=r"^task.answer_key='' is invalid: .*the task's own "
                                          r"reward \(math-verify\) grades against the answer"):
        dataset(tmp_path / "d.parquet", answer_key="")


def test_a_conversational_prompt_column_needs_a_chat_template(tmp_path):
    """Refused before start naming the key to set; a plain-text dataset needs none."""
    import copy

    tok = copy.deepcopy(char_tokenizer())
    tok.chat_template = None
    tok.save_pretrained(str(tmp_path / "tok"))
    conv = write("jsonl", tmp_path, CONVERSATIONAL)
    common = ["task=dataset", f"model.tokenizer={tmp_path / 'tok'}", "warm_start.steps=0",
              "task.max_new_tokens=8"]

    def config(*extra: str) -> subprocess.CompletedProcess:
        return run_cli("config", *common, *extra, timeout=300, cwd=tmp_path)

    r = config(f"task.dataset_path={conv}")
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "error: task.prompt_key='prompt' holds chat messages, but the tokenizer of "
        f"model.tokenizer={str(tmp_path / 'tok')!r} has no chat template to lay its messages out: "
        "set task.chat_template to a Jinja template (or a file of one), or task.chat_template=none "
        "to feed the messages' contents as plain text"], r.stderr
    plain = write("parquet", tmp_path, [{"prompt": r["prompt"][0]["content"], "answer": r["answer"]}
                                        for r in CONVERSATIONAL])
    assert config(f"task.dataset_path={plain}").returncode == 0
