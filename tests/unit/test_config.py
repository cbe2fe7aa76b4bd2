"""Typed config: every YAML under configs/ composes and validates; bad input names the key."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from areal_like.job_facts import dataset_size, model_context, model_vocab_size, request_frame_limit
from areal_like.settings import config as C
from areal_like.settings.config import (
    ConfigError,
    RunConfig,
    export_yaml,
    load_config,
    load_daemon_config,
    task_from_yaml,
    to_yaml,
)

CONFIG_DIR = C.config_dir()
GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir()
                if p.is_dir() and not p.name.startswith((".", "_")))
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONFIG_DIR / g).glob("*.yaml"))]


def composed(group: str, option: str, tmp_path: Path) -> RunConfig:
    """load_config of the option, with a value for each mandatory key its refusal names."""
    overrides = [f"{group}={option}"]
    while True:
        try:
            return load_config(overrides)
        except ConfigError as e:
            key = re.match(r"(\S+) is mandatory with ", str(e))
            if key is None or len(overrides) > 5:
                raise
            if "dataset" in key[1]:
                path = tmp_path / "data.jsonl"
                path.write_text('{"prompt": "1+1=", "answer": "2"}\n')
            else:
                path = tmp_path / key[1].replace(".", "_")
                path.mkdir(exist_ok=True)
            overrides.append(f"{key[1]}={path}")


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_yaml_composes_and_validates(group, option, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = composed(group, option, tmp_path)
    assert isinstance(cfg, RunConfig)
    assert C.from_yaml(to_yaml(cfg)).__dict__.keys() == cfg.__dict__.keys()
    assert to_yaml(C.from_yaml(to_yaml(cfg))) == to_yaml(cfg)
    assert not (tmp_path / "outputs").exists() and os.getcwd() == str(tmp_path)


def test_group_files_feed_the_typed_config_without_chdir_or_outputs(tmp_path, monkeypatch):
    assert {"model", "task", "loss", "topology"} <= set(GROUPS) and len(OPTIONS) >= 15
    monkeypatch.chdir(tmp_path)
    cfg = load_config(["model=small", "loss=tis", "task=sort"])
    assert (cfg.model.hidden_size == 384 and cfg.trainer.loss.kernel == "tis"
            and cfg.task.name == "sort")
    assert cfg.trainer.loss.tis.cap == 2.0 and cfg.trainer.loss.params is cfg.trainer.loss.tis
    assert load_config(["trainer.loss.kernel=ppo"]).trainer.loss.params is None  # shared knobs only
    assert load_config(["trainer.num_minibatches=8"]).trainer.num_minibatches == 8
    assert cfg.rollout.buffer_address == cfg.buffer.address  # interpolation resolved
    assert cfg.trainer.groups_per_step == cfg.buffer.groups_per_step
    assert os.getcwd() == str(tmp_path) and list(tmp_path.iterdir()) == []  # no outputs/, .hydra/


def error_of(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    return str(info.value)


NEGATIVE_BOUNDS = ("eps_clip_high", "gspo.eps_clip_high", "vcpo.ess_base", "vespo.k_pos",
                   "vespo.lambda_neg")  # a wrong sign inverts a clamp, NaNs the LR, flips VESPO


@pytest.mark.parametrize("overrides,named", [
    (["trainer.lr=abc"], ["trainer.lr", "'abc'", "could not be converted to Float"]),
    (["trainer.steps=1.5"], ["trainer.steps", "Integer"]),
    (["trainer.loss.kernel=xyz"], ["trainer.loss.kernel", *map(repr, C.LOSS_KINDS)]),
    (["loss=tis", "trainer.loss.tis.level=word"], ["trainer.loss.tis.level"]),
    (["trainer.loss.icepop.low=6"], ["trainer.loss.icepop.low"]),  # above icepop.high (5)
    (["buffer.fsync=sometimes"], ["buffer.fsync", "'always'", "'never'"]),
    (["model=nope"], ["model", "'nope'", *map(repr, C.group_options("model"))]),
    (["experiment=surely_not_an_experiment"], ["experiment"]),  # optional group: no silent skip
    (["trainer.nope=1"], ["trainer.nope", "lr"]),  # lists the keys that do exist
    (["+trainer.foo=1"], ["trainer.foo"]),
    (["+bogus=1"], ["bogus"]),
    (["trainer.lr"], ["trainer.lr"]),  # not key=value
    (["trainer.lr=${oops"], ["override 'trainer.lr=${oops' does not parse"]),
    (["model.path=~/m"], ["override 'model.path=~/m' does not parse", "only in quotes ",
                          "or use $HOME"]),
    (["model=local_hf"], ["model.path"]),  # mandatory values (``???``)
    (["task=jsonl_math"], ["task.dataset_path"]),
    (["buffer.max_staleness=-1"], ["buffer.max_staleness"]),
    (["buffer.capacity=2", "buffer.groups_per_step=4"], ["buffer.capacity"]),
    (["loss=vcpo", "trainer.loss.agg=token-mean"], ["trainer.loss.agg"]),
    (["loss=gspo", "trainer.loss.agg=seq-mean-token-sum"], ["trainer.loss.agg"]),
    (["model.num_key_value_heads=3"], ["model.num_attention_heads"]),
    (["task.top_p=0"], ["task.top_p"]),
    # a minibatch is whole groups (8 minibatches of the default 8 groups load)
    (["trainer.num_minibatches=16"], ["trainer.num_minibatches=16", "buffer.groups_per_step=8"]),
    (["trainer.num_minibatches=8", "buffer.groups_per_step=4"], ["buffer.groups_per_step=4"]),
    # Dr.GRPO's divisor: inf (every step skipped) or an ascent on the loss
    *[([f"trainer.loss.loss_scale_factor={c}"], ["trainer.loss.loss_scale_factor"])
      for c in ("0", "-4")],
    *[([f"trainer.loss.{k}=-0.5"], [f"trainer.loss.{k}"]) for k in NEGATIVE_BOUNDS],
    # a port of the user's would leave the server polling its own for health until the timeout
    *[([f"rollout.engine.sglang.{k}=x"], [f"rollout.engine.sglang.{k} is not passed through: "
                                          "the launcher sets it"])
      for k in ("model_path", "host", "port", "weight_version")],
])
def test_a_refusal_names_the_key_and_what_it_takes(overrides, named):
    msg = error_of(overrides)
    assert all(word in msg for word in named), msg


def test_knobs_no_kernel_reads_are_refused_naming_the_key():
    # a PPO trust region on a kernel without one would be silently ignored
    for loss, key in (("gspo", "dual_clip=3"), ("vespo", "eps_clip_high=0.28"),
                      ("vcpo", "eps_clip=0.1"), ("oapl", "dual_clip=2")):
        msg = error_of([f"loss={loss}", f"trainer.loss.{key}"])
        assert msg.startswith(f"trainer.loss.{key.split('=')[0]}=") and loss in msg, msg
    load_config(["loss=icepop", "trainer.loss.dual_clip=3", "trainer.loss.eps_clip_high=0.28"])
    # oapl's agg shapes only a KL term; only seq-mean-token-sum-norm reads loss_scale_factor
    assert error_of(["loss=oapl", "trainer.loss.agg=seq-mean-token-sum"]).startswith(
        "trainer.loss.agg='seq-mean-token-sum'")
    load_config(["loss=oapl", "trainer.loss.agg=seq-mean-token-sum", "trainer.loss.kl_coef=0.1"])
    assert error_of(["trainer.loss.loss_scale_factor=4"]).startswith(
        "trainer.loss.loss_scale_factor=4")
    load_config(["trainer.loss.agg=seq-mean-token-sum-norm", "trainer.loss.loss_scale_factor=4"])
    load_config(["trainer.loss.eps_clip_high=null", "trainer.loss.gspo.eps_clip_high=null"])


def test_an_own_models_dtype_and_micro_batches_follow_the_trainers_device(tmp_path):
    own = ["model=local_hf", f"model.path={tmp_path}"]
    assert load_config(own).model.dtype == "float32"
    assert load_config([*own, "trainer.device=cuda"]).model.dtype == "bfloat16"
    assert load_config([*own, "trainer.device=cuda:1"]).model.dtype == "bfloat16"
    assert load_config([*own, "topology=gpu_embedded"]).model.dtype == "bfloat16"  # sets none
    assert load_config([*own, "model.dtype=float16"]).model.dtype == "float16"

    def budget(*extra: str) -> int:
        return load_config([*own, *extra]).trainer.max_tokens_per_micro_batch

    assert budget() == budget("topology=laptop") == 2048  # a token budget on CPU
    assert budget("trainer.device=cuda") == budget("topology=gpu_embedded") == 0
    assert budget("trainer.max_tokens_per_micro_batch=0") == 0
    assert budget("trainer.max_tokens_per_micro_batch=512", "topology=gpu_embedded") == 512
    assert load_config([]).trainer.max_tokens_per_micro_batch == 0  # the tiny model's: as before
    # trainer.micro_batch_size set alone on the command line wins on CPU too
    cfg = load_config([*own, "trainer.micro_batch_size=4"])
    assert (cfg.trainer.micro_batch_size, cfg.trainer.max_tokens_per_micro_batch) == (4, 0)
    both = load_config([*own, "++trainer.micro_batch_size=4",
                        "trainer.max_tokens_per_micro_batch=512"])
    assert (both.trainer.micro_batch_size, both.trainer.max_tokens_per_micro_batch) == (4, 512)


def test_daemon_config_round_trip(tmp_path):
    # a fixed run_dir: the default one is stamped with the time of each composition
    cfg = load_config(["trainer.lr=3e-4", "loss=gspo", f"run_dir={tmp_path}"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    extra = ["rollout.server_id=rollout-0", "rollout.metrics_port=9101", "buffer.max_staleness=2"]
    daemon_cfg = load_daemon_config(["--config-file", str(path), *extra])
    assert daemon_cfg.rollout.server_id == "rollout-0" and daemon_cfg.rollout.metrics_port == 9101
    assert daemon_cfg.trainer.lr == 3e-4 and daemon_cfg.trainer.loss.kernel == "gspo"
    same = load_config(["trainer.lr=3e-4", "loss=gspo", f"run_dir={tmp_path}", *extra])
    assert to_yaml(daemon_cfg) == to_yaml(same)
    assert to_yaml(load_daemon_config(["--config-file", str(path)])) == path.read_text()
    assert to_yaml(load_daemon_config([f"--config-file={path}"])) == path.read_text()
    assert load_daemon_config(["--config-file", str(path), "++trainer.lr=2e-3"]).trainer.lr == 2e-3
    assert load_daemon_config(["task=sort"]).task.name == "sort"  # without a file: Hydra composes
    out = subprocess.run([sys.executable, "-m", "buffer", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("``python -m buffer [--config-file PATH]")


@pytest.fixture(scope="module")
def daemon_files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("daemon")
    (d / "config.yaml").write_text(to_yaml(load_config([f"run_dir={d}"])))
    (d / "bad.yaml").write_text("trainer: [unclosed\n")
    (d / "empty.yaml").write_text("\n")
    return d


@pytest.mark.parametrize("argv,message", [
    ("--confg-file {f}", "unknown option '--confg-file'"),
    ("--config-file {f} -v", "unknown option '-v'"),
    ("--config-file {f} trainer.lr=abc", r"trainer\.lr"),
    ("--config-file {f} trainer.nope=1", r"trainer\.nope"),
    ("--config-file {f} trainer.loss.kernel=xyz", r"trainer\.loss\.kernel"),
    ("--config-file {f} trainer.loss.tis_cap=3", r"trainer\.loss\.tis_cap"),
    ("--config-file {f} trainer.lr=${{oops", r"trainer\.lr"),  # does not parse: no traceback
    ("--config-file {f} +trainer.lrr=1", r"^trainer\.lrr: Key 'lrr' not in"),
    ("--config-file {f} trainer.lr", r"^override 'trainer\.lr' is not key=value"),
    ("--config-file {f} task=dataset", r"^task=dataset: a config group is chosen where"),
    ("--config-file {f} experiment=quickstart", r"^experiment=quickstart: a config group"),
    ("--config-file {d}/missing.yaml", "does not exist"),
    ("--config-file {d}/bad.yaml", "bad.yaml"),
    ("--config-file {d}", "is a directory"),
    ("--config-file {d}/empty.yaml", "is empty"),
    ("--config-file", None),
])
def test_a_daemon_refusal_names_the_option_key_or_file(daemon_files, argv, message):
    with pytest.raises(ConfigError, match=message):
        load_daemon_config(argv.format(f=daemon_files / "config.yaml", d=daemon_files).split())


def test_dataset_size(tmp_path):
    cfg = load_config(["task.num_prompts=37"])
    assert dataset_size(cfg.task, cfg.model) == 37
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "bbbb", "answer": "2"}\n')
    for task in ("jsonl_math", "dataset"):
        cfg = load_config([f"task={task}", f"task.dataset_path={data}"])
        assert dataset_size(cfg.task, cfg.model) == 2
    # counted after the prompt-length filter: test_datasets.py, test_long_prompts_are_filtered
    cfg = load_config(["task=jsonl_math", f"task.dataset_path={tmp_path / 'no.jsonl'}"])
    with pytest.raises(ConfigError, match="task.dataset_path"):
        dataset_size(cfg.task, cfg.model)


@pytest.mark.parametrize("content", [None, "{bad", "[1]"], ids=["missing", "not-json", "a-list"])
def test_an_unreadable_model_config_json_is_a_config_error_naming_model_path(tmp_path, content):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    cfg = load_config([f"model.path={tmp_path}"])
    for fact in (lambda: model_vocab_size(cfg.model), lambda: model_context(cfg.model),
                 lambda: request_frame_limit(cfg)):
        with pytest.raises(ConfigError, match="model.path=.*config.json"):
            fact()


def number_fields(obj, prefix: str = "") -> list[tuple[str, object, str]]:
    """(dotted key, its section, its field name) for each float or *_s field under obj."""
    hints = typing.get_type_hints(type(obj))
    out = []
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            out += number_fields(value, f"{prefix}{f.name}.")
        elif f.name.endswith("_s") or hint is float or float in typing.get_args(hint):
            out.append((f"{prefix}{f.name}", obj, f.name))
    return out


def test_every_number_and_duration_must_be_finite(tmp_path):
    """And a negative *_s: in a section, a daemon's file and at load."""
    cfg = load_config([])
    fields = number_fields(cfg)
    keys = [key for key, _, _ in fields]
    durations = [key for key in keys if key.endswith("_s")]
    assert len(keys) > 25 and {"launch.log_max_mb", "trainer.loss.dual_clip"} <= {*keys}
    assert len(durations) > 15 and {"trainer.gloo_timeout_s", "eval.final_timeout_s",
                                    # those that travel in messages
                                    "buffer.lease_timeout_s", "trainer.batch_wait_s",
                                    "trainer.weight_sync.deadline_s"} <= {*durations}
    for key, section, name in fields:
        for value in (float("inf"), float("-inf"), float("nan"), *([-1] * key.endswith("_s"))):
            as_typed = [value, value] if isinstance(getattr(section, name), list) else value
            with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}="):
                dataclasses.replace(section, **{name: as_typed})
    for key, value in zip(durations[::max(1, len(durations) // 3)], ("inf", "nan", "-1")):
        with pytest.raises(ConfigError, match=rf"(^| ){key.replace('.', '[.]')}={value}\b"):
            load_config([f"{key}={value}"])
    for key in ("launch.log_max_mb", "task.temperature"):
        assert key in error_of([f"{key}=inf"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    for key, value in zip(keys[::max(1, len(keys) // 3)], ("inf", "-inf", "nan")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_daemon_config(["--config-file", str(path), f"{key}={value}"])


def test_a_task_alone_checks_its_values_too():
    """Eval's TaskConfig alone."""
    text = export_yaml(C.TaskConfig())
    for value in ("inf", "-1"):
        with pytest.raises(ConfigError, match=rf"^task[.]reward_timeout_s={value}"):
            task_from_yaml(text, [f"task.reward_timeout_s={value}"])
    with pytest.raises(ConfigError, match="task.temperature"):
        task_from_yaml(text, ["task.temperature=${oops"])


def test_a_group_of_one_is_refused_only_where_every_advantage_is_zero():
    """OAPL/VCPO refuse it; the estimators give it no baseline: A = R."""
    for overrides in (["loss=vcpo", "trainer.estimator=rloo"], ["loss=oapl"]):
        msg = error_of(["task.group_size=1", *overrides])
        assert msg.startswith("task.group_size=1 is invalid") and "every advantage" in msg, msg
    for estimator in ("grpo", "drgrpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"):
        assert load_config(["task.group_size=1", f"trainer.estimator={estimator}"])


def test_sglang_flags_pass_through_without_hydras_plus(tmp_path):
    cfg = load_config(["topology=gpu_sglang", "rollout.engine.sglang.chunked_prefill_size=4096",
                       "rollout.engine.sglang.mem_fraction_static=0.7", f"run_dir={tmp_path}"])
    assert cfg.rollout.engine.sglang == {"mem_fraction_static": 0.7, "skip_server_warmup": True,
                                         "chunked_prefill_size": 4096}
    assert load_config(["rollout.engine.sglang.dtype=float16"]).rollout.engine.sglang == {
        "dtype": "float16"}
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    daemon = load_daemon_config(["--config-file", str(path),
                                 "rollout.engine.sglang.max_running_requests=8"])
    assert daemon.rollout.engine.sglang["max_running_requests"] == 8


@pytest.mark.parametrize("key", ["run_dir", "buffer.wal_dir", "trainer.checkpoint_dir",
                                 "warm_start.cache_dir", "security.keys_dir"])
@pytest.mark.parametrize("value", ["", "' '"])
def test_an_empty_directory_is_refused_not_read_as_the_one_it_is_relative_to(key, value):
    assert error_of([f"{key}={value}"]).startswith(f"{key}=")


def test_an_exports_task_file_names_its_files_absolute(tmp_path, monkeypatch):
    from areal_like.tasks.datasets import load_split

    launch, elsewhere = tmp_path / "launch", tmp_path / "elsewhere"
    (launch / "data").mkdir(parents=True)
    elsewhere.mkdir()
    (launch / "data" / "m.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n')
    (launch / "chat.jinja").write_text("{{ messages[0]['content'] }}")
    monkeypatch.chdir(launch)
    text = export_yaml(load_config(["task=dataset", "task.dataset_path=data/m.jsonl",
                                  "task.eval_path=data/m.jsonl",
                                  "task.chat_template=chat.jinja"]).task)
    monkeypatch.chdir(elsewhere)
    task = task_from_yaml(text, [])
    assert task.dataset_path == task.eval_path == str(launch / "data" / "m.jsonl")
    assert task.chat_template == str(launch / "chat.jinja")
    assert [e.answer for e in load_split(task, "eval")] == ["2"]
    # a template given as text stays text
    assert task_from_yaml(export_yaml(C.TaskConfig(chat_template="{{ x }}")),
                          []).chat_template == "{{ x }}"


@pytest.mark.parametrize("override", [
    "buffer.metrics_port=70000", "rollout.metrics_port=-1", "trainer.metrics_port=65536",
    "rollout.engine.port=-5", "trainer.weight_sync.master_port=99999", "trainer.device=gpu",
    "rollout.engine.device=cuda:x", "trainer.lr=inf", "trainer.betas=[0.9,2]",
    "trainer.weight_decay=-1", "trainer.warmup_steps=-3", "trainer.checkpoint_every=0",
    "rollout.engine.max_total_tokens=0", "rollout.engine.max_running_requests=0",
    "warm_start.lr=-1", "warm_start.batch_size=0", "buffer.segment_bytes=0",
    "buffer.max_epochs=-1", "buffer.max_tokens_per_trajectory=-5",
    "rollout.server_id=" + "s" * 129, "rollout.server_id='a\tb'"])
def test_values_a_daemon_or_the_optimizer_would_fail_on_later_are_refused_at_load(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}=.* is invalid"):
        load_config([override])


def test_a_run_dir_with_a_tilde_is_home_and_a_config_dir_without_configs_is_named(tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_config(['run_dir="~/runs/a"']).run_dir == str(tmp_path / "runs" / "a")
    monkeypatch.setenv("AREAL_LIKE_CONFIG_DIR", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"^AREAL_LIKE_CONFIG_DIR='.*nope' holds no config\.yaml"):
        load_config([])
