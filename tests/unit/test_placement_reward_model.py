"""A learned reward model's device on GPU topologies, offline (no GPU here): the layout gives each
rollout server's reward model a GPU of its own after its engine's (launch/placement.py), the
server's slot hands it that device, the Ray reservation counts it, and a layout without room for
it, or a device the server cannot see, is refused naming the key."""

from __future__ import annotations

import itertools
import re

import pytest

from areal_like.settings.config import ConfigError, load_config, load_daemon_config, to_yaml
from launch.job import plan_job
from launch.placement import place_node, place_nodes
from launch.ray_job import layout_bundles, request
from launch.topology import plan_lines
from tests.unit.test_placement import CLUSTER, _specs

RM = "task.reward_model.path=/models/rm"


def _device(spec) -> str | None:
    """The reward model's device the rollout server reads: its config with its slot's overrides."""
    given = [a for a in spec.argv if a.startswith("task.reward_model.device=")]
    return given[-1].split("=", 1)[1] if given else None


@pytest.mark.parametrize("gpus,trainer,servers,tp,want_rollout,want_rm", [
    (3, 1, 1, 1, ((1, 2),), (2,)),
    (8, 2, 2, 2, ((2, 3, 4), (5, 6, 7)), (4, 7)),
    (6, 0, 3, 1, ((0, 1), (2, 3), (4, 5)), (1, 3, 5)),
])
def test_each_rollout_server_gets_a_gpu_for_its_reward_model_after_its_engine(
        gpus, trainer, servers, tp, want_rollout, want_rm):
    p = place_node(gpus_per_node=gpus, trainer_ranks=trainer, rollout_servers=servers,
                   tp_size=tp, reward_model=True)
    assert (p.trainer, p.rollout, p.reward_model) == (tuple(range(trainer)), want_rollout,
                                                      want_rm)
    assert p.used == trainer + servers * (tp + 1) and not p.shared


def test_the_server_sees_its_engine_and_reward_model_gpus_and_is_handed_the_last(tmp_path):
    specs = _specs("topology=gpu_sglang", "launch.gpus_per_node=8", "launch.trainer_ranks=2",
                   "launch.num_rollout_servers=2", "rollout.engine.tp_size=2", RM)
    assert {n: s.env["CUDA_VISIBLE_DEVICES"] for n, s in specs.items()} == {
        "buffer": "", "rollout-0": "2,3,4", "rollout-1": "5,6,7", "trainer": "0,1"}
    # cuda:2 among the three it sees: GPUs 4 and 7; the engine keeps cuda:0-1 (SGLang's --tp-size)
    assert _device(specs["rollout-0"]) == _device(specs["rollout-1"]) == "cuda:2"
    config = tmp_path / "config.yaml"  # what the launcher writes, then the server reads
    config.write_text(to_yaml(load_config(["topology=gpu_sglang", RM])))
    argv = specs["rollout-0"].argv
    own = argv[argv.index("--config-file") + 2:]  # the slot's overrides
    cfg = load_daemon_config(["--config-file", str(config), *own])
    assert cfg.task.reward_model.device == "cuda:2"
    # the embedded engine on cuda (its cuda:0), its reward model on cuda:1
    embedded = _specs("topology=gpu_embedded", "launch.gpus_per_node=3", RM)
    assert embedded["rollout-0"].env["CUDA_VISIBLE_DEVICES"] == "1,2"
    assert _device(embedded["rollout-0"]) == "cuda:1"


def test_plan_shows_the_reward_model_gpu():
    cfg, topo = plan_job(load_config(["topology=gpu_sglang", "launch.gpus_per_node=4",
                                      "launch.trainer_ranks=2", "launch.num_rollout_servers=1",
                                      "rollout.engine.tp_size=1", RM, *CLUSTER[:2]]),
                         ports=itertools.count(32000))
    lines = plan_lines(cfg, topo)
    row = next(ln for ln in lines if " rollout-0 " in ln)
    assert re.search(r"rollout-0\s+2,3\s", row) and row.endswith("reward model on GPU 3 (cuda:1)")
    assert "reward model" not in "".join(ln for ln in lines if " rollout-" not in ln)


def test_a_cpu_device_or_a_cpu_topology_takes_no_gpu():
    """device=cpu on a GPU topology: the engines' layout as without a reward model, nothing
    handed; a CPU topology: auto is the CPU, and every process inherits CUDA_VISIBLE_DEVICES."""
    cpu = _specs("topology=gpu_sglang", "launch.gpus_per_node=8", "launch.trainer_ranks=4",
                 "launch.num_rollout_servers=2", "rollout.engine.tp_size=2", RM,
                 "task.reward_model.device=cpu")
    assert cpu["rollout-0"].env["CUDA_VISIBLE_DEVICES"] == "4,5"
    assert _device(cpu["rollout-0"]) is None
    laptop = _specs("launch.num_rollout_servers=2", "launch.trainer_ranks=1", RM)
    assert all("CUDA_VISIBLE_DEVICES" not in s.env for s in laptop.values())
    assert _device(laptop["rollout-0"]) is None
    assert load_config([RM]).task.reward_model.device == "auto"
    assert place_nodes(load_config(["launch.gpus_per_node=8", RM])) is None
    (mixed,) = place_nodes(load_config(["topology=gpu_embedded", "rollout.engine.device=cpu",
                                        "launch.gpus_per_node=1", RM]))
    assert (mixed.trainer, mixed.rollout, mixed.reward_model) == ((0,), (), ())


@pytest.mark.parametrize("overrides,message", [
    # the one-GPU node's sharing does not stretch to a reward model
    (("launch.gpus_per_node=1",),
     "launch.trainer_ranks=1 + launch.num_rollout_servers=1 x (rollout.engine.tp_size=1 + 1 for "
     "task.reward_model) needs 3 GPUs per node; launch.gpus_per_node=1"),
    (("launch.gpus_per_node=8", "launch.trainer_ranks=4", "launch.num_rollout_servers=2",
      "rollout.engine.tp_size=2"),
     "launch.trainer_ranks=4 + launch.num_rollout_servers=2 x (rollout.engine.tp_size=2 + 1 for "
     "task.reward_model) needs 10 GPUs per node; launch.gpus_per_node=8"),
    (("launch.gpus_per_node=4", "launch.nodes=2", "launch.trainer_ranks=4",
      "launch.num_rollout_servers=4", *CLUSTER),
     "launch.num_rollout_servers=4 x (rollout.engine.tp_size=1 + 1 for task.reward_model) needs "
     "8 GPUs per node (node 1 of 2); launch.gpus_per_node=4"),
])
def test_a_layout_without_room_for_the_reward_model_is_refused(overrides, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)) as e:
        place_nodes(load_config(["topology=gpu_sglang", RM, *overrides]))
    assert str(e.value).endswith("(set task.reward_model.device=cpu to score on the CPU)")
    # the same layout scoring on the CPU fits (one node) or fits the engines alone
    fits = load_config(["topology=gpu_sglang", RM, *overrides, "task.reward_model.device=cpu"])
    assert place_nodes(fits)


@pytest.mark.parametrize("overrides,message", [
    (("topology=gpu_sglang", "task.reward_model.device=cuda:1"),
     "task.reward_model.device='cuda:1' on a GPU topology: the layout gives each rollout server's "
     "reward model a GPU of its own"),
    (("topology=gpu_embedded", "rollout.engine.device=cpu", "task.reward_model.device=cuda"),
     "task.reward_model.device='cuda' on a GPU topology: the rollout servers' engines run on the "
     "CPU"),
])
def test_a_device_the_rollout_server_cannot_see_is_refused(overrides, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        place_nodes(load_config([*overrides, "launch.gpus_per_node=8", RM]))


def test_ray_reserves_the_reward_model_gpu():
    cfg = load_config(["topology=gpu_sglang", "launch.gpus_per_node=8", "launch.nodes=2",
                       "launch.trainer_ranks=8", "launch.num_rollout_servers=2",
                       "rollout.engine.tp_size=2", RM, *CLUSTER])
    assert request(cfg, "rollout") == (cfg.launch.ray_cpus, 3)
    bundles, shared = layout_bundles(cfg)
    assert not shared and [b["GPU"] for b in bundles] == [8.0, 6.0]
    cpu = load_config(["topology=gpu_sglang", "launch.gpus_per_node=8", RM,
                       "task.reward_model.device=cpu"])
    assert request(cpu, "rollout")[1] == 1
