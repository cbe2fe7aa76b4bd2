"""launch/preflight.py: every outside input fails in one line naming its key, before start."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from areal_like.settings.config import ConfigError, RunConfig, TaskConfig, load_config
from launch import preflight as pf
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def base() -> RunConfig:
    return load_config([])


def cfg_with(**task: object) -> RunConfig:
    return dataclasses.replace(base(), task=TaskConfig(**{"name": "reverse", **task}))


def model_cfg(**model: object) -> RunConfig:
    return dataclasses.replace(base(), model=dataclasses.replace(base().model, **model))


def hf_dir(path: Path, config: bool = True, weights: bool = True, tokenizer: bool = True) -> Path:
    path.mkdir(parents=True)
    if config:
        (path / "config.json").write_text("{}")
    if weights:
        (path / "model.safetensors").write_bytes(b"")
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_default_job_passes():
    assert pf.checked(base()) == base()


def test_the_dataset_tasks_own_example_passes_with_the_default_model():
    # configs/task/dataset.yaml's example as a user copies it (its max_new_tokens was refused)
    text = (ROOT / "configs/task/dataset.yaml").read_text().split("# Example")[1]
    lines = text.split("\nname:")[0].splitlines()[1:]
    pf.checked(load_config(shlex.split(" ".join(line.lstrip("# ") for line in lines))))


WEIGHTS = ("config.json", "model.safetensors")  # a model directory without its tokenizer
NOT_HF = "has no config.json: not a Hugging Face model directory"
NO_TOKENIZER = ("model.path={m} has no tokenizer files (tokenizer.json or tokenizer_config.json): "
                "give model.tokenizer=<a tokenizer directory>")


@pytest.mark.parametrize("layout, keys, want", [
    ({"m": (*WEIGHTS, "tokenizer.json")}, {"path": "m"}, []),
    ({"m": ("model.safetensors", "tokenizer.json")}, {"path": "m"}, ["model.path={m} " + NOT_HF]),
    ({"m": ("config.json", "tokenizer.json")}, {"path": "m"},
     ["model.path={m} has config.json but no weights (*.safetensors or *.bin)"]),
    ({"m": ("config.json", "tokenizer.json", "pytorch_model-00001-of-00002.bin")}, {"path": "m"},
     []),  # sharded
    ({}, {"path": "m"},
     ["model.path={m} does not exist (a Hugging Face model directory, or a hub id org/name)"]),
    ({"t": ()}, {"tokenizer": "t"}, ["model.tokenizer={t} has no tokenizer.json or "
                                     "tokenizer_config.json: not a tokenizer directory"]),
    ({"t": ("tokenizer_config.json",)}, {"tokenizer": "t"}, []),
    ({}, {"tokenizer": "bpe", "vocab_size": 512}, []),
    # a model built from config must have room for its tokenizer
    ({}, {"vocab_size": 50}, ["model.vocab_size=50 is smaller than the tokenizer "
                              "(model.tokenizer='char': 104 tokens)"]),
    # the daemons' load_tokenizer would refuse it 10-30 s later
    ({}, {"tokenizer": "bpe"}, ["model.vocab_size=104 is too small for model.tokenizer=bpe: it "
                                "needs at least 259 (256 bytes + 3 special tokens), e.g. 512"]),
    # a model saved without its tokenizer: a built-in one's ids are ones the model never saw
    ({"m": WEIGHTS}, {"path": "m", "tokenizer": "char"}, [NO_TOKENIZER]),
    ({"m": WEIGHTS}, {"path": "m", "tokenizer": "bpe"}, [NO_TOKENIZER]),
    ({"m": WEIGHTS, "t": ("tokenizer_config.json",)}, {"path": "m", "tokenizer": "t"}, []),
    ({"m": (*WEIGHTS, "tokenizer_config.json")}, {"path": "m"}, []),
    ({"t": ()}, {"ref_path": "t"}, ["trainer.ref_path={t} " + NOT_HF]),
])
def test_model_tokenizer_and_reference_paths_must_be_what_they_name(tmp_path, layout, keys, want):
    for folder, files in layout.items():
        (tmp_path / folder).mkdir()
        for name in files:
            (tmp_path / folder / name).write_text("{}")
    paths = {folder: str(tmp_path / folder) for folder in ("m", "t")}
    model = {k: paths.get(v, v) for k, v in keys.items() if k != "ref_path"}
    cfg = model_cfg(**model)
    if "ref_path" in keys:
        cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer,
                                                                   ref_path=paths["t"]))
    assert pf.check_models(cfg) == [w.format(**{k: repr(p) for k, p in paths.items()})
                                    for w in want]


def test_tokenizer_is_measured_against_the_embedding_of_model_path(tmp_path):
    """A model directory's embedding is its config.json's vocab_size, not model.vocab_size."""
    from areal_like.tasks.tokenizer import bpe_tokenizer, load_tokenizer

    tok = bpe_tokenizer(512)
    tok.save_pretrained(tmp_path / "tok")
    model = hf_dir(tmp_path / "model", tokenizer=False)
    (model / "config.json").write_text('{"vocab_size": 640}')
    cfg = model_cfg(path=str(model), tokenizer=str(tmp_path / "tok"))
    assert pf.check_models(cfg) == []
    assert len(load_tokenizer(cfg.model)) == len(tok)  # as the daemons load it
    small = hf_dir(tmp_path / "small", tokenizer=False)
    (small / "config.json").write_text('{"vocab_size": 300}')
    tok.save_pretrained(small)
    assert pf.check_models(model_cfg(path=str(small))) == [
        f"the tokenizer of model.path={str(small)!r} has {len(tok)} tokens, more than the "
        f"model's embedding holds (vocab_size 300 in the config.json of model.path={str(small)!r}"
        "): its last ids would index past it"]


def test_a_model_the_trainer_or_the_engine_cannot_run_is_refused_naming_why(tmp_path):
    from transformers import CohereConfig, Gemma2Config, GPT2Config, LlamaConfig, Qwen2Config

    dims = dict(vocab_size=104, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    configs = {"qwen2": Qwen2Config(**dims), "llama": LlamaConfig(**dims),
               "gpt2": GPT2Config(vocab_size=104, n_embd=64, n_layer=2, n_head=4),
               "gemma2": Gemma2Config(head_dim=16, **dims), "cohere": CohereConfig(**dims)}
    found = {}
    for name, config in configs.items():
        model = hf_dir(tmp_path / name)
        config.save_pretrained(model)
        found[name] = pf.check_architecture(model_cfg(path=str(model)))
    assert found["qwen2"] == found["llama"] == [] == pf.check_architecture(base())
    assert found["gpt2"] == [f"model.path={str(tmp_path / 'gpt2')!r} (GPT2LMHeadModel) is not a "
                             "model this job can train: its decoder blocks are not at model.layers"]
    # only the soft cap after lm_head is left (the rest: test_families.py)
    assert found["gemma2"][0].split(": ", 1)[1].split("; ") == [
        "config.json final_logit_softcapping=30.0 (the trainer's log-probs would leave it out)"]
    assert found["cohere"][0].endswith(": config.json logit_scale=0.0625 (the trainer's "
                                       "log-probs would leave it out)")


def test_a_warm_start_output_carries_its_tokenizer_and_passes(tmp_path):
    from launch import warmstart

    # the accuracy line after it: few prompts, short answers
    cfg = load_config([f"run_dir={tmp_path / 'run'}", "warm_start.steps=1",
                       "warm_start.batch_size=2", "warm_start.eval_prompts=1",
                       "task.max_new_tokens=2"])
    warmed = warmstart.ensure_warm_start(cfg, log=lambda m: None)
    assert (warmed.model.tokenizer == "char"
            and (Path(warmed.model.path) / "tokenizer.json").is_file())
    assert pf.checked(warmed) == warmed  # refined further: warm_start.steps still 1
    again = dataclasses.replace(warmed, warm_start=dataclasses.replace(warmed.warm_start, steps=0))
    assert pf.checked(again) == again


def test_warm_start_fine_tunes_a_hf_model_but_not_with_the_tiny_recipe(tmp_path):
    model = hf_dir(tmp_path / "qwen")
    # model.path=... alone keeps model=tiny and its recipe: refused, naming the way out
    cfg = model_cfg(path=str(model))
    assert base().warm_start.steps == 150
    assert pf.check_warm_start(cfg) == [
        f"model.path={str(model)!r} with the tiny model's recipe (warm_start.steps=150 "
        "warm_start.lr=0.003 warm_start.batch_size=64 trainer.lr=0.0003: model=tiny's and "
        "experiment=quickstart's, for a model built from config): for a Hugging Face model use "
        "model=local_hf without an experiment made for the tiny model (its warm start, "
        "supervised fine-tuning, is off unless warm_start.steps=N), or set those keys; "
        "warm_start.steps=0 for no warm start"]
    assert pf.check_warm_start(load_config(["model=local_hf", f"model.path={model}"])) == []
    # model=local_hf with a warm start of its own, even at the tiny model's numbers: SFT of it
    for ws in (["warm_start.steps=300"],
               ["warm_start.steps=150", "warm_start.lr=3e-3", "warm_start.batch_size=64"]):
        hf = load_config(["model=local_hf", f"model.path={model}", *ws])
        assert pf.check_warm_start(hf) == []
    # an experiment made for the tiny model brings its recipe with it
    assert pf.check_warm_start(load_config(["experiment=quickstart", "model=local_hf",
                                            f"model.path={model}"]))[0].startswith(
        f"model.path={str(model)!r} with the tiny model's recipe")
    assert pf.check_warm_start(base()) == []  # built from config
    # a directory an earlier warm start wrote: refined further
    (model / "warm_start.json").write_text("{}")
    assert pf.check_warm_start(cfg) == []
    # the SFT's own data must exist
    assert pf.check_warm_start(load_config(["model=local_hf", f"model.path={model}",
                                            "warm_start.steps=3",
                                            "warm_start.dataset_path=nope.jsonl"])) == [
        f"warm_start.dataset_path='nope.jsonl' does not exist (relative paths start at "
        f"{os.getcwd()})"]


def test_dataset_and_eval_files_must_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    assert pf.check_task_files(cfg_with(name="dataset", dataset_path="train.jsonl")) == []
    assert pf.check_task_files(cfg_with(name="dataset", dataset_path="data/math.jsonl")) == [
        f"task.dataset_path='data/math.jsonl' does not exist (relative paths start at {tmp_path})"]
    assert pf.check_task_files(cfg_with(name="dataset", dataset_path="train.jsonl",
                                        eval_path="test.jsonl")) == [
        f"task.eval_path='test.jsonl' does not exist (relative paths start at {tmp_path})"]
    # a synthetic task reads no file: a path given with one is refused, not silently ignored
    for key in ("dataset_path", "eval_path"):
        with pytest.raises(ConfigError, match=rf"task.{key}='mine.jsonl' is read only by "
                                              r"task=dataset, and task.name='reverse'"):
            cfg_with(**{key: "mine.jsonl"})


def test_dataset_columns_named_by_the_task_keys_must_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"question": "1+1=", "answer": "2", "level": 1}\n')
    (tmp_path / "eval.jsonl").write_text('{"question": "2+2=", "solution": "4"}\n')
    ok = dict(name="dataset", dataset_path="train.jsonl", prompt_key="question")
    assert pf.check_dataset_columns(cfg_with(**ok)) == []
    found = "in train.jsonl; columns found: question, answer, level"
    no_answer = "; task.answer_key='' when the reward (task.reward_fn) needs no answer"
    for keys, want in [
        ({"prompt_key": "prompt"}, f"task.prompt_key='prompt': no such column {found}"),
        ({"messages_key": "messages"}, f"task.messages_key='messages': no such column {found}"),
        ({"answer_key": "solution"},
         f"task.answer_key='solution': no such column {found}{no_answer}"),
        # both wrong: both named at once, not the answer's only once the messages' is fixed
        ({"messages_key": "messages", "answer_key": "solution"},
         f"task.messages_key='messages', task.answer_key='solution': no such columns {found}"
         f"{no_answer}"),
        ({"metadata_keys": ["level", "source"]},
         f"task.metadata_keys='source': no such column {found}"),
    ]:
        assert pf.check_dataset_columns(cfg_with(**{**ok, **keys})) == [want], keys
    assert pf.check_dataset_columns(cfg_with(**ok, eval_path="eval.jsonl")) == [
        "task.answer_key='answer': no such column in eval.jsonl; columns found: question, "
        "solution" + no_answer]
    (tmp_path / "broken.jsonl").write_text('{"question": "1+1=", "answer": \n')
    [line] = pf.check_dataset_columns(cfg_with(**{**ok, "dataset_path": "broken.jsonl"}))
    assert line.startswith("task.dataset_path='broken.jsonl' cannot be read: ") and "\n" not in line
    assert "JSON parse error" in line  # the reader's cause says what and where, not only datasets'
    (tmp_path / "empty.jsonl").write_text("")
    assert pf.check_dataset_columns(cfg_with(**{**ok, "dataset_path": "empty.jsonl"})) == [
        "task.dataset_path='empty.jsonl' has no rows"]
    # a missing file is check_task_files' line, not a second one here
    assert pf.check_dataset_columns(cfg_with(**{**ok, "dataset_path": "nope.jsonl"})) == []


def test_eval_every_needs_an_eval_split():
    # a dataset without one: the job would train without a single evaluation, saying nothing
    every = dataclasses.replace(base().eval, every=5)
    no_split = dataclasses.replace(cfg_with(name="dataset", dataset_path="train.jsonl"), eval=every)
    assert pf.check_eval_split(no_split) == [
        "eval.every=5: task.dataset_path has no eval split to evaluate: set task.eval_path or "
        "task.eval_fraction (or eval.every=0)"]
    for split in (dict(eval_path="test.jsonl"), dict(eval_fraction=0.1)):
        task = dataclasses.replace(no_split.task, **split)
        assert pf.check_eval_split(dataclasses.replace(no_split, task=task)) == []
    assert pf.check_eval_split(dataclasses.replace(cfg_with(), eval=every)) == []  # synthetic
    # eval.at_end (on by default) alone asks for nothing a dataset must have
    assert pf.check_eval_split(cfg_with(name="dataset", dataset_path="train.jsonl")) == []


def test_chat_template_is_auto_none_a_file_or_a_template_that_compiles(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for value in ("auto", "none", "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"):
        assert pf.check_chat_template(cfg_with(chat_template=value)) == [], value
    # what transformers' apply_chat_template accepts: loop controls and {% generation %} blocks
    (tmp_path / "chat.jinja").write_text("{% for m in messages %}{% generation %}{{ m['content'] }}"
                                         "{% endgeneration %}{% if loop.index > 2 %}"
                                         "{% break %}{% endif %}"
                                         "{% endfor %}")
    assert pf.check_chat_template(cfg_with(chat_template="chat.jinja")) == []
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}\n{{ m['content'] }}\n")
    [bad] = pf.check_chat_template(cfg_with(chat_template="bad.jinja"))
    assert bad.startswith("task.chat_template='bad.jinja' is not a valid Jinja template: ")
    assert bad.endswith("(line 2)")
    [bad] = pf.check_chat_template(cfg_with(chat_template="{{ messages[0]['content'] "))
    assert bad.startswith("task.chat_template=\"{{ messages[0]['content'] \" is not a valid Jinja")
    assert pf.check_chat_template(cfg_with(chat_template="templates/chatml.jinja")) == [
        "task.chat_template='templates/chatml.jinja' is not 'auto', 'none', an existing file "
        "or a Jinja template (a template contains '{{' or '{%')"]


LOAD = "cannot be loaded in a reward worker: "


@pytest.mark.parametrize("reward_fn,why", [
    ("my_rewards:score", None), ("my_rewards.score", None), ("my_rewards:loose", None),
    # called as fn(response, example): a reward that cannot be would score every sample 0
    ("my_rewards:one", LOAD + "it cannot be called as fn(response, example): TypeError: too many "
                              "positional arguments"),
    ("my_rewards:three", LOAD + "it cannot be called as fn(response, example): TypeError: missing "
                                "a required argument: 'extra'"),
    ("my_rewards:THRESHOLD", LOAD + "TypeError: THRESHOLD in my_rewards is a int, not a callable"),
    ("my_rewards:nothing", LOAD + "AttributeError: module 'my_rewards' has no attribute 'nothing'"),
    ("broken_rewards:score", LOAD + "ModuleNotFoundError: No module named 'no_such_package_areal'"),
    ("exits_rewards:score", LOAD + "SystemExit: 7"),
    ("score", "is not of the form package.module:function"),
    # a file's path for a module's name: said so, not "No module named 'my_rewards/py'"
    ("./my_rewards.py:score", "is not of the form package.module:function"),
    # the reward's own module is not found: where it was looked for
    ("elsewhere_rewards.mine:score", LOAD + "ModuleNotFoundError: No module named "
                                            "'elsewhere_rewards' (imported from the working "
                                            "directory, {cwd}, then PYTHONPATH)"),
    # its calls would return coroutines: every sample would score 0
    ("async_rewards:score", LOAD + "TypeError: async_rewards:score is an async def: a reward is "
                                   "a plain def fn(response, example) -> float (await inside it "
                                   "with asyncio.run)"),
])
def test_reward_fn_is_imported_from_the_working_directory_like_the_rollout_servers_do(
        tmp_path, monkeypatch, reward_fn, why):
    # the child Python finds my_rewards.py here, as `python -m rollout_server` would
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text("def score(response, example):\n    return 1.0\n"
                                            "def loose(*args, **kw):\n    return 1.0\n"
                                            "def one(response):\n    return 1.0\n"
                                            "def three(response, example, extra):\n    return 1.0\n"
                                            "THRESHOLD = 3\n")
    (tmp_path / "broken_rewards.py").write_text("import no_such_package_areal\n")
    (tmp_path / "exits_rewards.py").write_text("raise SystemExit(7)\n")
    (tmp_path / "async_rewards.py").write_text("async def score(response, example):\n"
                                               "    return 1.0\n")
    expected = [] if why is None else [f"task.reward_fn={reward_fn!r} "
                                       + why.format(cwd=tmp_path)]
    assert pf.check_reward_fn(cfg_with(reward_fn=reward_fn)) == expected
    # a remote reward replaces the function: its import is not the job's business
    assert pf.check_reward_fn(cfg_with(reward_fn=reward_fn,
                                       reward_url="http://127.0.0.1:1/r")) == []


def test_reward_fn_is_loaded_under_the_workers_memory_limit_and_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "big_rewards.py").write_text("BLOCK = bytearray(300 * 2**20)\n"
                                             "def score(response, example):\n"
                                             "    return 1.0\n")
    (tmp_path / "secret_rewards.py").write_text("import os\n"
                                                "TOKEN = os.environ['AREAL_TEST_API_TOKEN']\n"
                                                "def score(response, example):\n    return 1.0\n")
    # a reward worker (task.reward_memory_mb of address space) could not import it: refused
    assert pf.check_reward_fn(cfg_with(reward_fn="big_rewards:score", reward_memory_mb=256)) == [
        "task.reward_fn='big_rewards:score' cannot be loaded in a reward worker: "
        "MemoryError (task.reward_memory_mb=256 limits the address space)"]
    assert pf.check_reward_fn(cfg_with(reward_fn="big_rewards:score", reward_memory_mb=1024)) == []
    # no limit
    assert pf.check_reward_fn(cfg_with(reward_fn="big_rewards:score", reward_memory_mb=0)) == []
    # the workers' environment has no secrets: neither has the probe's
    monkeypatch.setenv("AREAL_TEST_API_TOKEN", "s3cret")
    assert pf.check_reward_fn(cfg_with(reward_fn="secret_rewards:score")) == [
        "task.reward_fn='secret_rewards:score' cannot be loaded in a reward worker: "
        "KeyError: 'AREAL_TEST_API_TOKEN'"]
    # task.reward_workers=0 loads it in the rollout server: no limit, the environment as it is
    for name in ("big_rewards", "secret_rewards"):
        assert pf.check_reward_fn(cfg_with(reward_fn=f"{name}:score", reward_memory_mb=256,
                                           reward_workers=0)) == []
    assert pf.check_reward_fn(cfg_with(reward_fn="big_rewards:nothing", reward_workers=0)) == [
        "task.reward_fn='big_rewards:nothing' cannot be loaded in the rollout server "
        "(task.reward_workers=0): "
        "AttributeError: module 'big_rewards' has no attribute 'nothing'"]


def test_sglang_engine_needs_its_package_and_a_model_directory(monkeypatch):
    cfg = load_config(["rollout.engine.kind=sglang", "warm_start.steps=0"])
    problems = pf.check_engine(cfg)
    assert ("rollout.engine.kind=sglang needs model.path (SGLang serves a Hugging Face model "
            "directory)" in problems)
    has_sglang = importlib.util.find_spec("sglang") is not None
    assert any(p.startswith("rollout.engine.kind=sglang needs the sglang package")
               for p in problems) != has_sglang
    assert pf.check_engine(base()) == []  # embedded
    # a missing sglang is answered for the machine at hand
    monkeypatch.setitem(sys.modules, "sglang", None)  # find_spec answers None: as if not installed
    hint = {device: next(p for p in pf.check_engine(load_config([
        "rollout.engine.kind=sglang", f"rollout.engine.device={device}"])) if "package" in p)
        for device in ("cpu", "cuda")}
    assert hint["cpu"].endswith("make its environment with tests/sglang/setup_env.sh DIR and run "
                                "DIR/bin/areal-like")
    assert hint["cuda"].endswith("pip install -e '.[gpu]' (or topology=gpu_embedded)")


@pytest.mark.parametrize("heads,kv,tp,ok", [(14, 2, 2, True), (14, 2, 4, False), (28, 4, 8, False),
                                              (32, 8, 8, True), (32, 4, 8, True), (12, 12, 3, True),
                                              (12, 12, 8, False)])
def test_tp_size_must_split_the_heads(tmp_path, heads, kv, tp, ok):
    """Query heads split evenly; key/value heads split evenly or are replicated (tp a multiple)."""
    (tmp_path / "config.json").write_text(f'{{"num_attention_heads": {heads}, '
                                          f'"num_key_value_heads": {kv}}}')
    cfg = load_config(["rollout.engine.kind=sglang", f"rollout.engine.tp_size={tp}",
                       f"model.path={tmp_path}"])
    problems = pf.check_tp_size(cfg)
    assert (problems == []) == ok
    if not ok:
        assert problems[0].startswith(f"rollout.engine.tp_size={tp} does not divide the model's "
                                      f"{heads} attention heads and {kv} key/value heads "
                                      f"({tmp_path / 'config.json'})")
    # 4 heads, 2 kv from config
    tiny = load_config(["rollout.engine.kind=sglang", "rollout.engine.tp_size=3"])
    assert pf.check_tp_size(tiny)[0].startswith("rollout.engine.tp_size=3 does not divide "
                                                "the model's 4 attention")


def test_preflight_lists_every_problem_and_checked_resolves_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "eval.jsonl").write_text('{"question": "2+2=", "answer": "4"}\n')
    cfg = dataclasses.replace(cfg_with(name="dataset", dataset_path="nope.jsonl",
                                       eval_path="eval.jsonl",
                                       chat_template="{% for %}"),
                              model=model_cfg(path=str(tmp_path / "no_model")).model)
    with pytest.raises(pf.PreflightError) as info:
        pf.checked(cfg)
    assert isinstance(info.value, ConfigError)
    keys = [p.split("=", 1)[0] for p in info.value.problems]
    # the second: a model path under the tiny model's warm-start recipe
    assert keys == ["model.path", "model.path", "task.dataset_path", "task.prompt_key",
                    "task.chat_template"]
    assert str(info.value).splitlines() == info.value.problems
    model = hf_dir(tmp_path / "model")
    good = dataclasses.replace(model_cfg(path=str(model)),
                               warm_start=dataclasses.replace(base().warm_start, steps=0))
    assert pf.checked(good) == good


@pytest.mark.parametrize("args, keys", [
    (["experiment=quickstart", "task.max_new_tokens=1000"], ["task.max_new_tokens"]),
    (["model.path=/nonexistent/no_model", "task=dataset", "task.dataset_path=train.jsonl",
      "task.eval_path=no_eval.jsonl", "task.reward_fn=no_such_module_areal:score"],
     ["model.path", "model.path", "task.eval_path", "task.reward_fn"]),
])
def test_areal_like_run_refuses_bad_inputs_in_one_line_each_before_starting_anything(
        tmp_path, args, keys):
    run_dir = tmp_path / "run"
    (tmp_path / "train.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    r = run_cli("run", "-q", f"run_dir={run_dir}", *args, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert [ln.split("=", 1)[0] for ln in r.stderr.splitlines()] == [f"error: {k}" for k in keys]
    assert not run_dir.exists()  # no warm start, no daemon, not even the run directory


@pytest.mark.parametrize("value", ["1", "true", "True", "yes", None, "", "0", "false"])
def test_an_inherited_return_original_logprob_is_refused_unless_unset_or_false(monkeypatch,
                                                                               value):
    monkeypatch.delenv("SGLANG_RETURN_ORIGINAL_LOGPROB", raising=False)
    if value is not None:
        monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", value)
    refused = value not in (None, "", "0", "false")
    assert [p.split(" is set")[0] for p in pf.check_environment(base())] == (
        [f"SGLANG_RETURN_ORIGINAL_LOGPROB={value!r}"] if refused else [])
    if refused:
        with pytest.raises(pf.PreflightError, match="^SGLANG_RETURN_ORIGINAL_LOGPROB="):
            pf.checked(base())


def test_a_chat_dataset_needs_a_chat_template_unless_the_task_says_what_to_do(tmp_path):
    import copy

    from areal_like.tasks.tokenizer import load_tokenizer

    tok = copy.deepcopy(load_tokenizer(base().model))
    tok.chat_template = None
    tok.save_pretrained(str(tmp_path / "tok"))
    data = _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"{i}+1?"}],
                                             "answer": str(i + 1)} for i in range(4)])
    common = ["task=dataset", f"task.dataset_path={data}", "task.messages_key=messages",
              f"model.tokenizer={tmp_path / 'tok'}", "warm_start.steps=0",
              "task.max_new_tokens=16"]  # task=dataset's 256 fill the tiny model's context

    def config(*extra: str) -> subprocess.CompletedProcess:
        return run_cli("config", *common, *extra, timeout=120, cwd=tmp_path)

    r = config()
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr.splitlines() == [
        "error: task.messages_key='messages' holds chat messages, but the tokenizer of "
        f"model.tokenizer={str(tmp_path / 'tok')!r} has no chat template to lay its messages out: "
        "set task.chat_template to a Jinja template (or a file of one), or task.chat_template=none "
        "to feed the messages' contents as plain text"]
    (tmp_path / "chat.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for says in ("task.chat_template=none", f"task.chat_template={tmp_path / 'chat.jinja'}"):
        r = config(says)
        assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("bad_row, why", [
    ({"prompt_messages": [{"role": "user", "content": "1+1?"}], "answer": None}, "has no answer"),
    ({"prompt_messages": None, "answer": "2"},
     "is not a non-empty list of {role, content} messages"),
    ({"prompt_messages": [], "answer": "2"}, "is not a non-empty list of {role, content} messages"),
])
def test_rows_whose_contents_make_no_example_are_refused_before_start_in_one_line(
        tmp_path, bad_row, why):
    good = {"prompt_messages": [{"role": "user", "content": "1+1?"}], "answer": "2"}
    data = _jsonl(tmp_path / "rows.jsonl", [bad_row if i in (3, 6) else good for i in range(8)])
    with pytest.raises(pf.PreflightError) as refused:
        pf.checked(load_config(["task=dataset", f"task.dataset_path={data}",
                                "task.messages_key=prompt_messages", "task.max_new_tokens=16"]))
    [line] = refused.value.problems
    assert line.startswith(f"task.dataset_path={str(data)!r}: 2 of 8 rows cannot be used "
                           "(rows 3, 6, counted from 0); the first: task."), line
    assert f"row 3 of {data} {why}" in line, line


def test_row_check_streams_batches_and_shows_the_first_rows(tmp_path):
    from areal_like.tasks import datasets as ds

    assert ds.ROW_BATCH <= 1024  # rows 1025+ are in a later batch: row numbers run on across them
    bad = {1, *range(1025, 1050, 4)}
    data = _jsonl(tmp_path / "rows.jsonl", [{"prompt": "p", "answer": None if i in bad else "a"}
                                            for i in range(1050)])
    task = TaskConfig(name="dataset", dataset_path=str(data))
    line = ds.check_rows(task, "task.dataset_path", str(data),
                         ds.load_table("task.dataset_path", str(data)))
    assert line.startswith(f"task.dataset_path={str(data)!r}: 8 of 1050 rows cannot be used "
                           "(rows 1, 1025, 1029, 1033, 1037, ..., counted from 0); "
                           "the first: task.answer_key='answer': row 1 of"), line
    ok = _jsonl(tmp_path / "ok.jsonl", [{"prompt": "p", "answer": "a"}] * 5)
    assert ds.check_rows(task, "task.dataset_path", str(ok),
                         ds.load_table("task.dataset_path", str(ok))) is None


def epochs_job(cfg: RunConfig, epochs: int, steps: int, groups: int) -> RunConfig:
    return dataclasses.replace(
        cfg, buffer=dataclasses.replace(cfg.buffer, max_epochs=epochs, groups_per_step=groups),
        trainer=dataclasses.replace(cfg.trainer, steps=steps, groups_per_step=groups))


def test_max_epochs_must_give_the_groups_the_job_trains_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _jsonl(tmp_path / "train.jsonl", [{"prompt": f"q{i}", "answer": str(i)} for i in range(3)])
    small = cfg_with(name="dataset", dataset_path="train.jsonl")

    def job(epochs: int, steps: int, groups: int, cfg: RunConfig = small) -> RunConfig:
        return epochs_job(cfg, epochs, steps, groups)

    with pytest.raises(pf.PreflightError) as refused:
        pf.checked(job(1, 4, 2))
    assert refused.value.problems == [
        "buffer.max_epochs=1: 1 pass over the 3 prompts of task.dataset_path gives 3 groups, "
        "fewer than the 8 the job trains on (trainer.steps=4 x buffer.groups_per_step=2): it "
        "would wait for data forever; raise buffer.max_epochs (0: no limit) or lower trainer.steps"]
    assert pf.check_epochs(job(3, 4, 2)) == []  # 9 groups for 8
    assert pf.check_epochs(job(0, 4, 2)) == []  # no limit
    synthetic = cfg_with(num_prompts=5)
    assert pf.check_epochs(job(2, 10, 1, synthetic)) == []
    assert pf.check_epochs(job(2, 11, 1, synthetic)) == [
        "buffer.max_epochs=2: 2 passes over the 5 prompts of task=reverse give 10 groups, fewer "
        "than the 11 the job trains on (trainer.steps=11 x buffer.groups_per_step=1): it would "
        "wait for data forever; raise buffer.max_epochs (0: no limit) or lower trainer.steps"]
    # an unreadable dataset is check_dataset_columns' line
    assert pf.check_epochs(job(1, 4, 2, cfg_with(name="dataset", dataset_path="nope.jsonl"))) == []


def kv_budget(cfg: RunConfig, tokens: int) -> RunConfig:
    return dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, engine=(
        dataclasses.replace(cfg.rollout.engine, max_total_tokens=tokens))))


def test_lengths_that_leave_no_room_in_the_context_are_refused_naming_the_keys(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert base().model.max_position_embeddings == 256
    assert pf.check_lengths(cfg_with(max_new_tokens=255, max_prompt_tokens=255)) == []
    job = dataclasses.replace(cfg_with(max_new_tokens=1000, max_prompt_tokens=256),
                              eval=dataclasses.replace(base().eval, max_new_tokens=300))
    assert pf.check_lengths(job) == [
        "task.max_new_tokens=1000 is not below the context of 256 tokens the engine serves "
        "(model.max_position_embeddings=256): a prompt of one token leaves room for 255 output "
        "tokens; set task.max_new_tokens to at most 255",
        "eval.max_new_tokens=300 is not below the context of 256 tokens the engine serves "
        "(model.max_position_embeddings=256): a prompt of one token leaves room for 255 output "
        "tokens; set eval.max_new_tokens to at most 255",
        "task.max_prompt_tokens=256 is not below the context of 256 tokens the engine serves "
        "(model.max_position_embeddings=256): a prompt that long leaves no room to generate; "
        "set task.max_prompt_tokens to at most 255"]
    longer = dataclasses.replace(job, rollout=dataclasses.replace(
        job.rollout, engine=dataclasses.replace(job.rollout.engine, kind="sglang",
                                                sglang={"context_length": 2048})))
    assert pf.check_lengths(longer) == []  # SGLang serves 2048 tokens
    # the embedded engine's KV budget: the context is min(positions, max_total_tokens)
    assert pf.check_lengths(kv_budget(cfg_with(max_new_tokens=127), 128)) == []
    assert pf.check_lengths(kv_budget(cfg_with(max_new_tokens=200), 128)) == [
        "task.max_new_tokens=200 is not below the context of 128 tokens the engine serves "
        "(rollout.engine.max_total_tokens=128): a prompt of one token leaves room for 127 output "
        "tokens; set task.max_new_tokens to at most 127"]
    # a budget over the model's positions: the model's 256 bind
    assert pf.check_lengths(kv_budget(cfg_with(max_new_tokens=200), 512)) == []
    # a dataset whose every prompt (the char tokenizer: one token a character) leaves no room
    _jsonl(tmp_path / "long.jsonl", [{"prompt": "x" * (256 + i), "answer": "1"} for i in range(3)])
    long = cfg_with(name="dataset", dataset_path="long.jsonl")
    with pytest.raises(pf.PreflightError) as refused:
        pf.checked(long)
    assert refused.value.problems == [
        "task.dataset_path='long.jsonl': each of its 3 prompts is 256 tokens or longer, the "
        "context the engine serves (model.max_position_embeddings=256): none leaves room to "
        "generate"]
    (tmp_path / "long.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n'
                                         + (tmp_path / "long.jsonl").read_text())
    assert pf.check_lengths(long) == []  # one prompt fits: the others are skipped at run time
    assert pf.check_lengths(dataclasses.replace(long, task=dataclasses.replace(
        long.task, max_prompt_tokens=3))) == [
        "task.max_prompt_tokens=3: each of the 4 prompts of task.dataset_path='long.jsonl' is "
        "longer: none is left"]
    assert pf.check_lengths(cfg_with(name="dataset", dataset_path="nope.jsonl")) == []
    # an eval split whose every prompt leaves no room
    (tmp_path / "train.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    _jsonl(tmp_path / "evals.jsonl", [{"prompt": "x" * (256 + i), "answer": "1"} for i in range(2)])
    job = cfg_with(name="dataset", dataset_path="train.jsonl", eval_path="evals.jsonl")
    job = dataclasses.replace(job, eval=dataclasses.replace(job.eval, every=5))
    assert pf.check_lengths(job) == [
        "task.eval_path='evals.jsonl': each of its 2 prompts is 256 tokens or longer, the "
        "context the engine serves (model.max_position_embeddings=256): none leaves room to "
        "generate, so no evaluation (eval.every=5) scores one"]
    assert pf.check_lengths(dataclasses.replace(job, eval=dataclasses.replace(
        job.eval, every=0))) == []  # never evaluated
    (tmp_path / "evals.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n'
                                          + (tmp_path / "evals.jsonl").read_text())
    assert pf.check_lengths(job) == []  # one eval prompt fits


@pytest.mark.parametrize("long_prompt,budget", [(300, 512), (150, 128)])
def test_max_epochs_counts_only_the_prompts_that_leave_room_in_the_context(
        tmp_path, monkeypatch, long_prompt, budget):
    monkeypatch.chdir(tmp_path)
    _jsonl(tmp_path / "mix.jsonl",
           [{"prompt": "x" * (long_prompt if i % 2 else 3), "answer": "1"} for i in range(4)])
    job = epochs_job(kv_budget(cfg_with(name="dataset", dataset_path="mix.jsonl"), budget), 1, 4, 1)
    assert pf.check_epochs(job) == [
        "buffer.max_epochs=1: 1 pass over the 2 prompts of task.dataset_path that leave room in "
        f"the context of {min(budget, 256)} tokens the engine serves gives 2 groups, fewer than "
        "the 4 the job trains on (trainer.steps=4 x buffer.groups_per_step=1): it would wait for "
        "data forever; raise buffer.max_epochs (0: no limit) or lower trainer.steps"]
    assert pf.check_epochs(epochs_job(job, 1, 2, 1)) == []
    if budget < 256:  # all 4 fit the model's 256
        assert pf.check_epochs(kv_budget(job, 256)) == []


def test_sglang_refuses_an_untied_gemma3_whose_lm_head_it_would_never_load(tmp_path):
    from tests.families import family_config

    def problems(family: str, tied: bool) -> list[str]:
        d = tmp_path / f"{family}-{tied}"
        config = family_config(family)
        config.tie_word_embeddings = tied
        config.save_pretrained(str(d))
        return pf.check_engine(load_config(["rollout.engine.kind=sglang", "warm_start.steps=0",
                                            f"model.path={d}"]))

    refused = [p for p in problems("gemma3", False) if "lm_head" in p]
    assert len(refused) == 1 and "tie_word_embeddings false" in refused[0]
    assert "serve it with rollout.engine.kind=embedded" in refused[0]
    assert not any("lm_head" in p for p in problems("gemma3", True) + problems("qwen2", False))
