"""`areal-like run` with no experiment: the quickstart's recipe, its own directory, free ports."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from areal_like.settings.config import ConfigError, load_config, load_daemon_config, to_yaml
from launch.job import prepare

ROOT = Path(__file__).resolve().parents[2]


def test_the_default_job_is_the_quickstart_recipe():
    default, quick = load_config([]), load_config(["experiment=quickstart"])
    assert default.warm_start.steps > 0 and default.warm_start == quick.warm_start
    assert default.model == quick.model and default.task == quick.task  # reverse 6 letters at T=2
    assert ((default.trainer.lr, default.trainer.micro_batch_size, default.trainer.steps)
            == (3e-4, 64, 200))
    assert default.trainer.loss == quick.trainer.loss
    # and the layout: both leave the counts to the cores (launch/topology.py, laptop_layout)
    assert default.launch == quick.launch
    assert (default.launch.num_rollout_servers, default.launch.trainer_ranks) == (None, None)
    assert re.fullmatch(r"runs/default/\d{8}-\d{6}", default.run_dir), default.run_dir
    assert (default.buffer.address == default.rollout.buffer_address
            == default.trainer.buffer_address == default.buffer.pub_address == "tcp://127.0.0.1:0")


def test_two_prepared_jobs_get_different_ports(tmp_path):
    a, topo_a, _ = prepare(load_config([f"run_dir={tmp_path / 'a'}"]))
    b, topo_b, _ = prepare(load_config([f"run_dir={tmp_path / 'b'}"]))
    ports_a, ports_b = set(topo_a.ports().values()), set(topo_b.ports().values())
    # the old defaults were 5555/5556 for every run
    assert 0 not in ports_a | ports_b and ports_a != ports_b
    assert a.buffer.address.endswith(f":{topo_a.ports()['buffer_router']}")  # what the daemons read
    assert f"address: {b.buffer.address}" in (tmp_path / "b" / "config.yaml").read_text()


@pytest.mark.parametrize("overrides, lr, micro_batch_size", [
    # a real model: no supervised phase on someone's model, the schema's defaults
    (["model=local_hf", "model.path=.", "task=addition"], 1e-5, 8),
    # the benchmark keeps a random-init model
    (["experiment=bench_async"], 1e-4, None),
])
def test_a_real_model_or_a_benchmark_gets_none_of_the_tiny_models_recipe(overrides, lr,
                                                                          micro_batch_size):
    cfg = load_config(overrides)
    assert (cfg.warm_start.steps, cfg.task.temperature, cfg.trainer.lr) == (0, 1.0, lr)
    assert micro_batch_size in (None, cfg.trainer.micro_batch_size)


@pytest.mark.parametrize("extra", [[], ["experiment=quickstart"], ["experiment=quickstart_lora"]])
@pytest.mark.parametrize("task", ["sort", "calc"])
def test_a_task_chosen_on_the_command_line_wins(extra, task):
    # its own file's settings too: the quickstart's reversal lengths left calc's tool calls (63
    # characters) 8 tokens to be written in
    assert load_config([*extra, f"task={task}"]).task == load_config([f"task={task}"]).task


@pytest.mark.parametrize("experiment", sorted(
    p.stem for p in (ROOT / "configs/experiment").glob("*.yaml")))
def test_no_experiment_silently_replaces_a_task_chosen_on_the_command_line(experiment):
    # experiment=math_chat task=sort trained on math_chat's dataset (its body set task.name)
    try:
        cfg = load_config([f"experiment={experiment}", "task=sort"])
    except ConfigError as e:  # refused in one line is fine: the task is that experiment's own
        assert "task" in str(e)
        return
    assert cfg.task.name == "sort"


def test_daemons_started_by_hand_check_their_addresses_and_take_the_multinode_ones(tmp_path):
    """Port 0 and a port past 65535 (libzmq took it modulo 65536) are refused naming the key."""
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(load_config([f"run_dir={tmp_path}"])))
    for keys in (("buffer.address", "buffer.pub_address"),
                 ("rollout.buffer_address", "rollout.pub_address"),
                 ("trainer.buffer_address",)):
        with pytest.raises(ConfigError,
                           match=rf"^{re.escape(keys[0])}='tcp://127.0.0.1:0' has port 0"):
            load_daemon_config(["--config-file", str(path)], addresses=keys)
        with pytest.raises(ConfigError, match=rf"^{re.escape(keys[0])}='tcp://h:99999': port "
                                              "'99999' is not a port number"):
            load_daemon_config(["--config-file", str(path), f"{keys[0]}=tcp://h:99999"],
                               addresses=keys)
    ipc = load_daemon_config(["rollout.buffer_address=ipc:///local/router",  # one node: no port
                              "rollout.pub_address=ipc:///local/pub"],
                             addresses=("rollout.buffer_address", "rollout.pub_address"))
    assert ipc.rollout.buffer_address == "ipc:///local/router"
    # what launch/slurm/areal_like.sbatch and launch/MULTINODE.md pass to `areal-like config`
    multinode = load_config(["topology=gpu_sglang", f"run_dir={tmp_path}",
                             "buffer.address=tcp://10.0.0.1:5555",
                             "buffer.pub_address=tcp://10.0.0.1:5556", "buffer.metrics_port=9100",
                             "trainer.metrics_port=9200",
                             "trainer.weight_sync.master_addr=10.0.0.1"])
    path.write_text(to_yaml(multinode))
    loaded = load_daemon_config(["--config-file", str(path)], addresses=("rollout.buffer_address",
                                                                          "rollout.pub_address"))
    assert (loaded.rollout.buffer_address, loaded.rollout.pub_address) == ("tcp://10.0.0.1:5555",
                                                                          "tcp://10.0.0.1:5556")
    assert dataclasses.asdict(loaded.buffer) == dataclasses.asdict(multinode.buffer)


def test_the_multinode_recipes_pass_explicit_addresses():
    for doc in ("launch/slurm/areal_like.sbatch", "launch/MULTINODE.md"):
        text = (ROOT / doc).read_text()
        assert re.search(r"buffer\.address=\"?tcp://\$HEAD", text), doc
        assert re.search(r"buffer\.pub_address=\"?tcp://\$HEAD", text), doc
