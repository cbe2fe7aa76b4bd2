"""Shipped tasks, their rewards and the char tokenizer (the math reward: test_math_reward.py)."""

import json

import pytest

from areal_like.config import ConfigError, ModelConfig, TaskConfig
from areal_like.tokenizer import BOS_ID, EOS_ID, char_tokenizer, load_tokenizer
from rollout_server.tasks import Example, make_task


@pytest.mark.parametrize("name", ["addition", "sort", "reverse", "countdown"])
def test_synthetic_tasks_are_deterministic_and_solvable(name):
    task = make_task(TaskConfig(name=name, digits=2, num_prompts=50))
    assert len(task) == 50
    for i in range(50):
        ex = task.example(i)
        assert ex == make_task(TaskConfig(name=name, digits=2, num_prompts=50)).example(i)
        assert task.reward(ex.answer, ex) == 1.0
        assert task.reward(ex.answer + "7", ex) == 0.0
    with pytest.raises(IndexError):
        task.example(50)


def test_addition_content():
    ex = make_task(TaskConfig(name="addition", digits=2)).example(0)
    a, b = ex.prompt[:-1].split("+")
    assert int(ex.answer) == int(a) + int(b)


def test_countdown_accepts_any_valid_expression_and_rejects_reuse():
    ex = Example("cd 3 5 7 to 15:", "3+5+7")
    task = make_task(TaskConfig(name="countdown"))
    assert task.reward("7+5+3", ex) == 1.0
    assert task.reward("5*3", ex) == 1.0
    assert task.reward("5*3*1", ex) == 0.0  # 1 is not offered
    assert task.reward("7+7+1", ex) == 0.0
    assert task.reward("__import__('os')", ex) == 0.0


def test_jsonl_task_and_math_reward(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "1/2+1/4?", "answer": "3/4"}) + "\n\n"
                 + json.dumps({"prompt": "big", "answer": "1,234"}) + "\n")
    task = make_task(TaskConfig(name="jsonl", dataset_path=str(p)))
    assert len(task) == 2
    assert task.reward("the result is \\boxed{\\frac{3}{4}}", task.example(0)) == 1.0
    assert task.reward("0.75", task.example(0)) == 1.0
    assert task.reward("answer: 1234.", task.example(1)) == 1.0
    assert task.reward("no number", task.example(1)) == 0.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1"):
        make_task(TaskConfig(name="jsonl", dataset_path=str(bad)))


def test_char_tokenizer_round_trip(tmp_path):
    tok = char_tokenizer()
    text = "What is 12+30?\nAnswer: 42"
    ids = tok(text)["input_ids"]
    assert ids[0] == BOS_ID and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.eos_token_id == EOS_ID and len(tok) == 104
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(ModelConfig(path=str(tmp_path)))
    assert again(text)["input_ids"] == ids
