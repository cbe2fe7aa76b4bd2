"""areal_like/tasks/prepare_math.py's command line on the shipped GSM8K and MATH samples
(areal_like/tasks/data/samples/): hand-read answers, and math-verify's reward on them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from areal_like.tasks.datasets import Example
from areal_like.tasks.prepare_math import gsm8k_answer, last_boxed
from areal_like.tasks.rewards import math_reward

SAMPLES = Path(__file__).resolve().parents[2] / "areal_like" / "tasks" / "data" / "samples"


def prepare(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "areal_like.tasks.prepare_math", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _prepare(kind: str, out: Path, train: Path, test: Path) -> dict:
    done = prepare(kind, "--train", str(train), "--test", str(test), "--out", str(out))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _example(row: dict) -> Example:
    return Example(prompt=row["messages"][0]["content"], answer=row["answer"])


@pytest.mark.parametrize("text,want", [
    ("so 3*4=<<3*4=12>>12\n#### 12", "12"),
    ("#### 1,776", "1776"),  # thousands separators go
    ("a #### 5 then #### -7 ", "-7"),
    ("no marker", None),
    ("####  ", None),
])
def test_gsm8k_answer(text, want):
    assert gsm8k_answer(text) == want


@pytest.mark.parametrize("text,want", [
    (r"so $\boxed{\frac{8}{15}}$.", r"\frac{8}{15}"),
    (r"\boxed{1} first, then \boxed{x^{2}+\sqrt{3}}", r"x^{2}+\sqrt{3}"),
    (r"\fbox{4\sqrt{6}}", r"4\sqrt{6}"),
    (r"\boxed {7}", "7"),
    (r"\boxed{\frac{1}{2}", None),  # never closed
    ("no box", None),
])
def test_last_boxed(text, want):
    assert last_boxed(text) == want


def test_gsm8k_sample_becomes_chat_rows_the_reward_grades(tmp_path):
    summary = _prepare("gsm8k", tmp_path, SAMPLES / "gsm8k" / "train.jsonl",
                       SAMPLES / "gsm8k" / "test.jsonl")
    assert summary["train"] == {"rows": 32, "dropped": 0}
    assert summary["test"] == {"rows": 12, "dropped": 0}
    test = pq.read_table(tmp_path / "test.parquet").to_pylist()
    raw = [json.loads(line) for line in (SAMPLES / "gsm8k" / "test.jsonl").open()]
    assert [r["messages"] for r in test] == [[{"role": "user", "content": r["question"]}]
                                             for r in raw]  # the test split keeps its order
    i = next(i for i, r in enumerate(raw) if r["question"].startswith("Jun earns $13"))
    assert raw[i]["answer"].endswith("#### 2,184") and test[i]["answer"] == "2184"
    assert math_reward(r"4 weeks: \boxed{2184}", _example(test[i])) == 1.0
    assert math_reward(r"\boxed{2,184}", _example(test[i])) == 1.0
    assert math_reward(r"\boxed{2183}", _example(test[i])) == 0.0
    train = pq.read_table(tmp_path / "train.parquet").to_pylist()
    raw_train = [json.loads(line) for line in (SAMPLES / "gsm8k" / "train.jsonl").open()]
    assert sorted(r["messages"][0]["content"] for r in train) == sorted(
        r["question"] for r in raw_train)
    assert [r["messages"][0]["content"] for r in train] != [r["question"] for r in raw_train]


def test_math_sample_answers_from_boxed_and_from_the_answer_column(tmp_path):
    summary = _prepare("math", tmp_path, SAMPLES / "math" / "train.jsonl",
                       SAMPLES / "math" / "test.jsonl")
    assert summary["train"]["rows"] == 32 and summary["test"]["rows"] == 12
    train = pq.read_table(tmp_path / "train.parquet").to_pylist()
    row = next(r for r in train if r["messages"][0]["content"] == r"Simplify $\sqrt{96}$.")
    assert (row["answer"], row["level"], row["subject"]) == (r"4\sqrt{6}", "Level 3", "Algebra")
    assert math_reward(r"so the answer is $\boxed{4\sqrt{6}}$", _example(row)) == 1.0
    assert math_reward(r"$\boxed{\sqrt{96}}$", _example(row)) == 1.0  # math-verify: equal values
    assert math_reward(r"$\boxed{6\sqrt{4}}$", _example(row)) == 0.0
    test = pq.read_table(tmp_path / "test.parquet").to_pylist()
    assert test[0]["answer"] == r"\frac{11}{28}" and test[0]["level"] == "1"  # MATH-500's column


def test_rows_without_a_final_answer_are_dropped_and_counted(tmp_path):
    rows = [{"question": "a?", "answer": "so\n#### 3"}, {"question": "b?", "answer": "no marker"}]
    src = tmp_path / "raw.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = _prepare("gsm8k", tmp_path / "out", src, src)
    assert summary["test"] == {"rows": 1, "dropped": 1}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[1]) + "\n")
    done = prepare("gsm8k", "--train", str(bad), "--test", str(src), "--out", str(tmp_path / "o"))
    assert done.returncode != 0 and "no row of" in done.stderr and "final answer" in done.stderr


@pytest.mark.parametrize("kind,train,want", [
    # no network (HF_HUB_OFFLINE stands for it): the hub's error in one line, and the way out
    ("gsm8k", None, "cannot load 'openai/gsm8k' from the Hugging Face hub"),
    ("gsm8k", "gsm8k/main/train.parquet", "--train gsm8k/main/train.parquet: no such file"),
    ("math", "GSM", "no 'problem' column (it has 'question', 'answer'): is it a math"),
    ("gsm8k", "notes.txt", "--train notes.txt: source='notes.txt': expected a .jsonl"),
])
def test_a_source_it_cannot_read_is_one_error_line(kind, train, want, tmp_path):
    gsm = SAMPLES / "gsm8k" / "test.jsonl"
    (tmp_path / "notes.txt").write_text("not a table\n")
    args = [] if train is None else ["--train", str(gsm) if train == "GSM" else train,
                                     "--test", str(gsm)]
    done = prepare(kind, *args, cwd=tmp_path,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    assert want in done.stderr
    assert not (tmp_path / "data").exists()


def test_a_directory_of_several_splits_is_refused_not_mixed(tmp_path):
    """A hub snapshot's train and test files together would mix test problems into training."""
    snapshot = tmp_path / "gsm8k" / "main"
    snapshot.mkdir(parents=True)
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (SAMPLES / "gsm8k" / f"{split}.jsonl").open()]
        pq.write_table(pa.Table.from_pylist(rows), snapshot / f"{split}-00000-of-00001.parquet")
    done = prepare("gsm8k", "--train", "gsm8k", "--test",
                   "gsm8k/main/test-00000-of-00001.parquet", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr == ("error: --train gsm8k: the directory holds the files of several splits "
                           "(test, train); give the train split's file or directory\n")
    assert not (tmp_path / "data").exists()
    summary = _prepare("gsm8k", tmp_path / "out", snapshot / "train-00000-of-00001.parquet",
                       snapshot / "test-00000-of-00001.parquet")
    assert summary["train"]["rows"] == 32 and summary["test"]["rows"] == 12
