"""Shipped tasks, their rewards and the char tokenizer (the math reward: test_math_reward.py)."""

import json
import pickle

import pytest

from areal_like.settings.config import ConfigError, ModelConfig, TaskConfig
from areal_like.tasks.callables import import_function, split_function_path
from areal_like.tasks.rewards import math_reward
from areal_like.tasks.task import (
    SYNTHETIC_EVAL_SIZE,
    DatasetTask,
    Example,
    countdown_reward,
    exact_match,
    has_eval_split,
    load_function,
    make_task,
)
from areal_like.tasks.tokenizer import BOS_ID, EOS_ID, char_tokenizer, load_tokenizer


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


@pytest.mark.parametrize("name", ["addition", "sort", "reverse", "countdown"])
def test_synthetic_eval_split_is_fixed_and_drawn_apart_from_train(name):
    cfg = TaskConfig(name=name, digits=4, num_prompts=1000)
    assert has_eval_split(cfg)
    train, ev = make_task(cfg), make_task(cfg, split="eval")
    assert (len(ev) == SYNTHETIC_EVAL_SIZE
            and len(make_task(TaskConfig(name=name, num_prompts=9), split="eval")) == 9)
    assert [ev.example(i) for i in range(20)] == [make_task(cfg, split="eval").example(i)
                                                  for i in range(20)]
    assert [ev.example(i) for i in range(20)] != [train.example(i) for i in range(20)]
    assert all(ev.reward(ev.example(i).answer, ev.example(i)) == 1.0 for i in range(20))
    with pytest.raises(IndexError):
        ev.example(SYNTHETIC_EVAL_SIZE)
    with pytest.raises(ValueError, match="split='test'"):
        make_task(cfg, split="test")


def test_rewards_are_module_level_functions_named_by_path():
    for name, fn in (("addition", exact_match), ("reverse", exact_match),
                     ("countdown", countdown_reward)):
        task = make_task(TaskConfig(name=name))
        assert load_function(task.reward_path) is fn
    # named by path: areal_like never imports it
    assert load_function(DatasetTask.reward_path) is math_reward


def test_one_parser_for_function_paths():
    assert split_function_path("pkg.mod:fn") == ("pkg.mod", "fn")
    assert split_function_path("pkg.mod.fn") == ("pkg.mod", "fn")  # no colon: the last dot
    assert load_function("areal_like.tasks.task.exact_match") is exact_match
    for bad in ("fn", "pkg.mod:", ":fn", ""):
        with pytest.raises(ValueError, match="is not of the form package.module:function"):
            split_function_path(bad)
    with pytest.raises(TypeError,
                       match="SPLITS in areal_like.tasks.task is a tuple, not a callable"):
        import_function("areal_like.tasks.task:SPLITS")
    with pytest.raises(AttributeError, match="no_such_reward"):
        import_function("areal_like.tasks.task:no_such_reward")


def test_example_is_frozen_and_picklable():
    ex = Example("p", "a", ({"role": "user", "content": "p"},), {"level": 2, "tags": ["x"]})
    assert pickle.loads(pickle.dumps(ex)) == ex
    assert (Example("p", "a").metadata == {}
            and Example("p", "a").metadata is not Example("q", "b").metadata)
    with pytest.raises(AttributeError):
        ex.answer = "b"


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
    assert task.reward("(7+5)+3", ex) == 1.0 and task.reward("7+(5+3", ex) == 0.0


@pytest.mark.parametrize("expr,prompt,want", [
    # only offered numbers and + - * ( ): eval would compute 9**(8**7) (millions of digits) or
    # 2**999999; the parser refuses the power operator outright
    ("9**8**7", "cd 9 8 7 to 15:", 0.0), ("2**999999", "cd 2 999999 to 4:", 0.0),
    ("2*999999", "cd 2 999999 to 1999998:", 1.0),
    ("-3+5", "cd 3 5 to 2:", 0.0),  # unary minus is not an operator here
    ("3" * 41, "cd 3 to 3:", 0.0),  # over the length bound
    ("8/2*3", "cd 8 2 3 to 12:", 1.0),  # (8/2)*3
    ("(8+2)/3", "cd 8 2 3 to 3:", 0.0),  # 10/3 is not 3: exact, no rounding
    ("(3-3)", "cd 3 3 to 0:", 1.0), ("8/(3-3)", "cd 8 3 3 to 0:", 0.0),  # division by zero
    ("8//2", "cd 8 2 to 4:", 0.0),  # floor division is not offered
    ("1000000000*2", "cd 1000000000 2 to 2000000000:", 0.0),  # not small
])
def test_countdown_parses_divides_exactly_and_refuses_what_is_not_arithmetic(expr, prompt, want):
    assert countdown_reward(expr, Example(prompt, "")) == want


def test_dataset_task_and_math_reward(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "1/2+1/4?", "answer": "3/4"}) + "\n\n"
                 + json.dumps({"prompt": "big", "answer": "1,234"}) + "\n")
    task = make_task(TaskConfig(name="dataset", dataset_path=str(p)))
    assert len(task) == 2
    assert task.reward("the result is \\boxed{\\frac{3}{4}}", task.example(0)) == 1.0
    assert task.reward("0.75", task.example(0)) == 1.0
    assert task.reward("answer: 1234.", task.example(1)) == 1.0
    assert task.reward("no number", task.example(1)) == 0.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ConfigError, match="task.answer_key='answer'.*columns found: prompt"):
        make_task(TaskConfig(name="dataset", dataset_path=str(bad)))


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
