"""task.name=dataset: local formats, key mapping, splits, prompt filtering, chat templates."""

from __future__ import annotations

import csv
import datetime
import json
import logging
from decimal import Decimal
from pathlib import Path

import msgpack
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from areal_like.job_facts import dataset_size
from areal_like.settings.config import ConfigError, ModelConfig, TaskConfig
from areal_like.tasks import datasets as D
from areal_like.tasks.data import make_math_chat
from areal_like.tasks.task import Example, encode_prompt, has_eval_split, make_task
from areal_like.tasks.tokenizer import bpe_tokenizer, char_tokenizer, load_tokenizer

ROWS = [{"question": f"What is {a} + {b}?", "answer": str(a + b), "level": a % 3, "source": "hand"}
        for a, b in [(2, 3), (10, 7), (41, 1), (6, 6), (9, 0), (13, 29)]]
EXPECTED = [Example(r["question"], r["answer"], None, {"level": r["level"], "source": r["source"]})
            for r in ROWS]
MATH_CHAT = Path(make_math_chat.__file__).parent / "math_chat"
BRACKETS = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write(fmt: str, tmp_path: Path, rows: list[dict] = ROWS) -> Path:
    """``rows`` stored in format ``fmt``; returns the path task.dataset_path takes."""
    if fmt == "jsonl":
        return write_jsonl(tmp_path / "d.jsonl", rows)
    if fmt == "json":
        (tmp_path / "d.json").write_text(json.dumps(rows))
        return tmp_path / "d.json"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
        return tmp_path / "d.parquet"
    if fmt == "csv":
        with (tmp_path / "d.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return tmp_path / "d.csv"
    if fmt == "dir":  # two shards, nested, read in sorted path order
        (tmp_path / "shards" / "part").mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows[:4]), tmp_path / "shards" / "part" / "0.parquet")
        pq.write_table(pa.Table.from_pylist(rows[4:]), tmp_path / "shards" / "part" / "1.parquet")
        return tmp_path / "shards"
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved"


def task_cfg(path, **kw) -> TaskConfig:
    return TaskConfig(name="dataset", dataset_path=str(path), **{"prompt_key": "question", **kw})


def examples(task) -> list[Example]:
    return [task.example(i) for i in range(len(task))]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "dir", "save_to_disk"])
def test_every_format_gives_the_same_examples(fmt, tmp_path):
    path = write(fmt, tmp_path)
    task = make_task(task_cfg(path))
    assert examples(task) == EXPECTED  # csv's integer answers come back as the same text
    assert examples(make_task(task_cfg(path))) == EXPECTED  # and again, identically
    with pytest.raises(IndexError):
        task.example(len(EXPECTED))


def test_eval_split_from_its_own_file_or_a_saved_dataset_dicts_test_split(tmp_path):
    import datasets

    train = write_jsonl(tmp_path / "train.jsonl", ROWS[:4])
    own = task_cfg(train, eval_path=str(write_jsonl(tmp_path / "eval.jsonl", ROWS[4:])),
                   eval_fraction=0.5)  # eval_path set: nothing held out of train
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:4]),
                          "test": datasets.Dataset.from_list(ROWS[4:])}).save_to_disk(
                              str(tmp_path / "dd"))
    by_role = task_cfg(tmp_path / "dd", eval_path=str(tmp_path / "dd"))
    for cfg in (own, by_role):
        assert has_eval_split(cfg) and examples(make_task(cfg)) == EXPECTED[:4]
        assert examples(make_task(cfg, split="eval")) == EXPECTED[4:]


def test_key_mapping_messages_answer_and_metadata(tmp_path):
    rows = [{"chat": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "2+3?"}],
             "gold": 5, "level": 1, "src": "a"}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    ex = make_task(task_cfg(path, messages_key="chat", answer_key="gold")).example(0)
    assert ex == Example("Be brief.\n2+3?", "5", tuple(rows[0]["chat"]), {"level": 1, "src": "a"})
    only = make_task(task_cfg(path, messages_key="chat", answer_key="gold",
                              metadata_keys=["src"])).example(0)
    assert only.metadata == {"src": "a"}
    assert make_task(task_cfg(path, messages_key="chat", answer_key="gold",
                              metadata_keys=[])).example(0).metadata == {}


@pytest.mark.parametrize("override,key,column", [
    ({"prompt_key": "prompt"}, "task.prompt_key", "prompt"),
    ({"messages_key": "messages"}, "task.messages_key", "messages"),
    ({"answer_key": "solution"}, "task.answer_key", "solution"),
    ({"metadata_keys": ["level", "difficulty"]}, "task.metadata_keys", "difficulty"),
])
def test_a_missing_column_names_the_key_and_lists_the_columns(override, key, column, tmp_path):
    with pytest.raises(ConfigError) as err:
        make_task(task_cfg(write("parquet", tmp_path), **override))
    assert (f"{key}={column!r}" in str(err.value)
            and "columns found: question, answer, level, source" in str(err.value))


def test_bad_rows_are_named(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"m": [{"role": "user", "content": "hi"}],
                                               "answer": "1"},
                                              {"m": "not a chat", "answer": "2"}])
    with pytest.raises(ConfigError, match="task.messages_key='m': row 1 of .*m.jsonl"):
        make_task(task_cfg(path, messages_key="m"))
    write_jsonl(tmp_path / "n.jsonl", [{"question": "q", "answer": None}])
    with pytest.raises(ConfigError, match="task.answer_key='answer': row 0"):
        make_task(task_cfg(tmp_path / "n.jsonl"))
    # a blank prompt encodes to nothing the model could answer (the buffer refuses empty prompts)
    write_jsonl(tmp_path / "b.jsonl", [{"question": "q", "answer": "1"},
                                       {"question": " \n", "answer": "2"}])
    with pytest.raises(ConfigError, match="task.prompt_key='question': row 1 of .* has no prompt"):
        make_task(task_cfg(tmp_path / "b.jsonl"))
    (tmp_path / "mixed").mkdir()
    write_jsonl(tmp_path / "mixed" / "a.jsonl", ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "mixed" / "b.parquet")
    with pytest.raises(ConfigError, match="mixes formats"):
        make_task(task_cfg(tmp_path / "mixed"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="task.dataset_path=.*notes.txt.*expected a .jsonl"):
        make_task(task_cfg(tmp_path / "notes.txt"))


@pytest.mark.parametrize("value", ["openai/gsm8k", "hf://datasets/openai/gsm8k",
                                   "https://example.com/d.jsonl",
                                   "missing.parquet"])
def test_anything_but_a_local_path_is_refused(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"task.dataset_path='{value}' is not a local file or "
                                          "directory.*never downloaded"):
        make_task(task_cfg(value))
    with pytest.raises(ConfigError, match=f"task.eval_path='{value}' is not a local"):
        make_task(task_cfg(write("jsonl", tmp_path), eval_path=value), split="eval")


def test_eval_split_by_fraction_is_fixed_disjoint_and_seeded(tmp_path):
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(40)]
    cfg = task_cfg(write_jsonl(tmp_path / "d.jsonl", rows), eval_fraction=0.25, seed=3)
    train, ev = examples(make_task(cfg)), examples(make_task(cfg, split="eval"))
    assert len(ev) == 10 and len(train) == 30
    # disjoint, complete
    assert sorted(e.prompt for e in train + ev) == sorted(r["question"] for r in rows)
    assert [int(e.answer) for e in train] == sorted(int(e.answer) for e in train)  # file order kept
    # same every call
    assert examples(make_task(cfg, split="eval")) == ev and examples(make_task(cfg)) == train
    other = examples(make_task(task_cfg(tmp_path / "d.jsonl", eval_fraction=0.25, seed=4),
                               split="eval"))
    assert other != ev
    # at least one row held out
    assert [len(part) for part in D.split_indices(3, 0.01, 0)] == [2, 1]
    assert [len(part) for part in D.split_indices(3, 0.99, 0)] == [1, 2]  # and at least one kept
    with pytest.raises(ConfigError, match="task.eval_fraction=0.5: the dataset has 1 row"):
        D.split_indices(1, 0.5, 0)
    no_eval = task_cfg(tmp_path / "d.jsonl")
    assert not has_eval_split(no_eval)
    with pytest.raises(ConfigError,
                       match="no eval split: set task.eval_path or task.eval_fraction"):
        make_task(no_eval, split="eval")


def test_long_prompts_are_filtered_and_counted_once(tmp_path, caplog):
    rows = [{"question": "x" * n, "answer": "1"} for n in (3, 5, 8, 10)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    tok = char_tokenizer()  # plain text: <bos> + one id per character -> 4, 6, 9, 11 ids
    cfg = task_cfg(path, chat_template="none", max_prompt_tokens=6)
    with caplog.at_level(logging.INFO, logger="areal_like.tasks.task"):
        assert [e.prompt for e in examples(make_task(cfg, tok))] == ["xxx", "xxxxx"]
        make_task(cfg, tok)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["task: 2 of 4 prompts over max_prompt_tokens=6 filtered"]
    # the char template as task.chat_template: "user: " + prompt + "\nassistant: " = 18 + n ids
    templated = task_cfg(path, max_prompt_tokens=23, chat_template=tok.chat_template)
    assert [len(e.prompt) for e in examples(make_task(templated, tok))] == [3, 5]
    assert (dataset_size(templated, ModelConfig()) == 2
            and dataset_size(task_cfg(path), ModelConfig()) == 4)
    with pytest.raises(ValueError, match="pass the tokenizer"):
        make_task(cfg)
    with pytest.raises(ConfigError, match="task.max_prompt_tokens=2: every prompt"):
        make_task(task_cfg(path, chat_template="none", max_prompt_tokens=2), tok)


def test_metadata_values_become_plain_msgpack_types(tmp_path):
    table = pa.table({"question": ["q"], "answer": ["a"], "f32": pa.array([0.5], pa.float32()),
                      "when": pa.array([datetime.datetime(2024, 1, 2, 3, 4)], pa.timestamp("s")),
                      "day": pa.array([datetime.date(2024, 5, 6)]), "yes": [True],
                      "ids": pa.array([[1, 2]], pa.list_(pa.int16())),
                      "dec": pa.array([Decimal("1.10")]), "s": [{"a": 3, "b": [0.25]}]})
    pq.write_table(table, tmp_path / "t.parquet")
    meta = make_task(task_cfg(tmp_path / "t.parquet")).example(0).metadata
    assert meta == {"f32": 0.5, "when": "2024-01-02T03:04:00", "day": "2024-05-06", "yes": True,
                    "ids": [1, 2], "dec": "1.10", "s": {"a": 3, "b": [0.25]}}
    assert type(meta["yes"]) is bool and msgpack.unpackb(msgpack.packb(meta)) == meta


# ---------------------------------------------------------------- prompt encoding
def test_chat_template_ids_are_the_tokenizers_own(tmp_path):
    cfg = task_cfg(MATH_CHAT / "eval.parquet", messages_key="messages")
    ex = make_task(cfg).example(0)
    bpe = bpe_tokenizer(512)
    bpe.save_pretrained(tmp_path / "tok")
    reloaded = load_tokenizer(ModelConfig(tokenizer=str(tmp_path / "tok"), vocab_size=512))
    for tok in (bpe, reloaded):
        ids = encode_prompt(tok, ex, cfg)
        assert ids == tok.apply_chat_template(list(ex.messages), add_generation_prompt=True,
                                              return_dict=False)
        assert tok.decode(ids) == (f"<|im_start|>user\n{ex.prompt}<|im_end|>\n"
                                   "<|im_start|>assistant\n")
    # (auto on a plain row: plain text, test_prompt_layout.py); a template given: a user message
    plain_row = Example("What is 2 + 3?", "5")
    chatml = task_cfg(MATH_CHAT / "eval.parquet", chat_template=bpe.chat_template)
    assert bpe.decode(encode_prompt(bpe, plain_row, chatml)) == (
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_from_a_file_or_a_long_string_for_every_task(tmp_path):
    """(none, auto and a template string on a plain row: test_prompt_layout.py)"""
    tok, ex = char_tokenizer(), Example("What is 2 + 3?", "5")
    expected = tok("[user] What is 2 + 3?\n[assistant] ", add_special_tokens=False)["input_ids"]
    (tmp_path / "t.jinja").write_text(BRACKETS)
    assert (encode_prompt(tok, ex, task_cfg("d", chat_template=str(tmp_path / "t.jinja")))
            == expected)
    # no newline, past NAME_MAX
    long_line = BRACKETS.replace("\n", "{{ '\\n' }}") + "{# " + "x" * 300 + " #}"
    assert encode_prompt(tok, ex, task_cfg("d", chat_template=long_line)) == expected
    # an explicit template applies to every task
    synthetic = TaskConfig(name="addition", chat_template=BRACKETS)
    assert encode_prompt(tok, ex, synthetic) == expected
    # the shared tokenizer is untouched
    assert tok.chat_template.startswith("{% for m in messages %}{{ m['role'] }}: ")
    with pytest.raises(ConfigError, match="task.chat_template='chatml' is not"):
        encode_prompt(tok, ex, task_cfg("d", chat_template="chatml"))


def test_system_prompt_in_chat_and_plain_modes():
    tok = char_tokenizer()
    ex = Example("2+3?", "5")
    chat = encode_prompt(tok, ex, task_cfg("d", system_prompt="Be brief.",
                                           chat_template=tok.chat_template))
    assert tok.decode(chat) == "system: Be brief.\nuser: 2+3?\nassistant: "
    for template in ("none", "auto"):  # auto: a plain prompt is plain text
        plain = encode_prompt(tok, ex, task_cfg("d", system_prompt="Be brief.",
                                                chat_template=template))
        assert tok.decode(plain, skip_special_tokens=True) == "Be brief.\n2+3?"
        assert plain[0] == tok.bos_token_id
    own = Example("x", "5", ({"role": "system", "content": "Mine."},
                             {"role": "user", "content": "2+3?"}))
    assert tok.decode(encode_prompt(tok, own, task_cfg("d", system_prompt="Be brief."))) == (
        "system: Mine.\nuser: 2+3?\nassistant: ")  # the row's own system message wins


# ---------------------------------------------------------------- shipped example data
def test_math_chat_files_are_what_the_generator_writes_and_load_as_chat_rows():
    generated = make_math_chat.rows()
    for split in ("train", "eval"):
        path = MATH_CHAT / f"{split}.parquet"
        assert path.stat().st_size < 1_000_000
        assert pq.read_table(path).to_pylist() == generated[split]
    questions = {split: {r["messages"][0]["content"] for r in generated[split]}
                 for split in generated}
    assert len(questions["train"]) == 1079 and len(questions["eval"]) == 300
    assert not questions["train"] & questions["eval"]
    # a chat dataset with metadata
    cfg = task_cfg(MATH_CHAT / "train.parquet", eval_path=str(MATH_CHAT / "eval.parquet"),
                   messages_key="messages")
    train, ev = make_task(cfg), make_task(cfg, split="eval")
    assert (len(train), len(ev)) == (1079, 300)
    for ex in (train.example(i) for i in range(len(train))):  # every answer is the question's value
        expression = ex.prompt.removeprefix("What is ").removesuffix("?")
        assert set(expression) <= set("0123456789+-* ") and int(ex.answer) == eval(expression)
        assert (set(ex.metadata) == {"source", "level"}
                and ex.metadata["level"] in (1, 2, 3, 4, 5, 6))
