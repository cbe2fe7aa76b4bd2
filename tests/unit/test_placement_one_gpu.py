"""launch/placement.py on a one-GPU machine: the trainer and one engine share GPU 0, the weight path
resolves to ``tensor``, and what cannot work there (NCCL group, SGLang taking the whole GPU) is
refused."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from areal_like.settings.config import ConfigError, load_config
from launch.job import job_specs, plan_job
from launch.placement import (
    SHARED_MEM_FRACTION_DEFAULT,
    SHARED_MEM_FRACTION_MAX,
    place_node,
    place_nodes,
    with_weight_path,
)
from launch.topology import apply_topology, plan_topology
from tests.conftest import run_cli

ONE_GPU_SGLANG = ("topology=gpu_sglang", "launch.gpus_per_node=1",
                  "rollout.engine.sglang.mem_fraction_static=0.4")


def test_one_gpu_one_trainer_rank_one_server_share_gpu_0():
    p = place_node(gpus_per_node=1, trainer_ranks=1, rollout_servers=1, tp_size=1)
    assert (p.trainer, p.rollout, p.used, p.shared) == ((0,), ((0,),), 1, True)
    assert not place_node(gpus_per_node=2, trainer_ranks=1, rollout_servers=1, tp_size=1).shared


def test_auto_weight_path_is_tensor_only_when_the_gpu_is_shared():
    shared = with_weight_path(load_config(list(ONE_GPU_SGLANG)))
    assert shared.trainer.weight_sync.path == "tensor"
    apart = with_weight_path(load_config(["topology=gpu_sglang", "launch.gpus_per_node=2"]))
    assert apart.trainer.weight_sync.path == "distributed"
    assert with_weight_path(load_config([])).trainer.weight_sync.path == "distributed"  # CPU
    disk = with_weight_path(load_config([*ONE_GPU_SGLANG, "trainer.weight_sync.path=disk"]))
    assert disk.trainer.weight_sync.path == "disk"  # an explicit choice is kept
    embedded = with_weight_path(load_config(["topology=gpu_embedded", "launch.gpus_per_node=1"]))
    assert embedded.trainer.weight_sync.path == "tensor"


def test_an_sglang_lora_job_gets_its_adapter_as_a_directory_on_any_gpu_of_the_trainers_node():
    """The adapter reaches SGLang as a PEFT directory the trainer writes (path disk), which any
    GPU of its node can read; on a second node there is no such directory."""
    lora = ["topology=gpu_sglang", "trainer.lora.rank=8", "model.dtype=float32"]
    for gpus in ("1", "2"):
        cfg = with_weight_path(load_config([*lora, f"launch.gpus_per_node={gpus}"]))
        assert cfg.trainer.weight_sync.path == "disk", gpus
    for two_nodes in ([*lora, "launch.gpus_per_node=2", "launch.nodes=2",
                       "buffer.address=tcp://10.0.0.1:5555",
                       "buffer.pub_address=tcp://10.0.0.1:5556",
                       "trainer.weight_sync.master_addr=10.0.0.1"],
                      ["topology=cpu_sglang", "trainer.lora.rank=8", "launch.nodes=2"]):  # CPU too
        with pytest.raises(ConfigError, match=r"^trainer\.lora\.rank > 0 with rollout\.engine\."
                                              r"kind=sglang and launch\.nodes=2"):
            place_nodes(load_config(two_nodes))
    embedded = with_weight_path(load_config(["topology=gpu_embedded", "trainer.lora.rank=8",
                                             "launch.gpus_per_node=1",
                                             "trainer.weight_sync.backend=gloo",
                                             "model.dtype=float32"]))
    assert embedded.trainer.weight_sync.path == "distributed"  # its adapter goes over the group


def test_shared_gpu_refusals_name_the_key():
    with pytest.raises(ConfigError, match=r"^trainer\.weight_sync\.path=distributed "
                                          r"with the trainer and the engine"):
        place_nodes(load_config([*ONE_GPU_SGLANG, "trainer.weight_sync.path=distributed"]))
    # gloo on CUDA tensors shares a GPU fine
    place_nodes(load_config([*ONE_GPU_SGLANG, "trainer.weight_sync.path=distributed",
                           "trainer.weight_sync.backend=gloo"]))
    for frac in ("0.8", "0", "'lots'"):
        with pytest.raises(ConfigError, match=r"^rollout\.engine\.sglang\.mem_fraction_static="):
            place_nodes(load_config(["topology=gpu_sglang", "launch.gpus_per_node=1",
                                   f"rollout.engine.sglang.mem_fraction_static={frac}"]))
    place_nodes(load_config(["topology=gpu_sglang", "launch.gpus_per_node=1",
                           f"rollout.engine.sglang.mem_fraction_static={SHARED_MEM_FRACTION_MAX}"]))


def test_a_shared_gpu_gives_sglang_a_fraction_that_leaves_the_trainer_room():
    """The one-GPU first start needs no memory key: unset, SGLang gets the shared default there, and
    keeps its own choice (no key) on a GPU of its own; a value the user set is kept."""
    shared = with_weight_path(load_config(["topology=gpu_sglang", "launch.gpus_per_node=1"]))
    assert shared.rollout.engine.sglang["mem_fraction_static"] == SHARED_MEM_FRACTION_DEFAULT
    apart = with_weight_path(load_config(["topology=gpu_sglang", "launch.gpus_per_node=2"]))
    assert apart.rollout.engine.sglang["mem_fraction_static"] is None  # omitted from the argv
    mine = with_weight_path(load_config(["topology=gpu_sglang", "launch.gpus_per_node=1",
                                         "rollout.engine.sglang.mem_fraction_static=0.3"]))
    assert mine.rollout.engine.sglang["mem_fraction_static"] == 0.3


def test_both_processes_see_gpu_0_and_the_daemons_read_the_tensor_path():
    cfg, topo = plan_job(load_config(list(ONE_GPU_SGLANG)))
    specs = {s.name: s for s in job_specs(cfg, topo, Path("/x/config.yaml"), python="py")}
    assert (specs["trainer"].env["CUDA_VISIBLE_DEVICES"] == "0"
            == specs["rollout-0"].env["CUDA_VISIBLE_DEVICES"])
    assert cfg.trainer.weight_sync.path == "tensor"
    topo2 = plan_topology(cfg, itertools.count(31000))
    assert apply_topology(cfg, topo2).trainer.weight_sync.path == "tensor"


def test_plan_prints_the_shared_gpu_and_the_path():
    r = run_cli("plan", *ONE_GPU_SGLANG, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = {row.split(None, 3)[1]: row.split(None, 3)
            for row in r.stdout.split("\n\n")[0].splitlines()[1:]}
    assert rows["rollout-0"][2] == "0" and rows["trainer"][2] == "0"
    assert "weight sync tensor (no group)" in rows["trainer"][3]
    # what job_specs starts for one rank
    assert "python -m trainer (1 rank, no torchrun)" in rows["trainer"][3]


def test_vllm_on_one_shared_gpu_takes_the_group_over_gloo_and_leaves_the_trainer_room():
    """vLLM takes whole weights by the group only (no tensor path), which NCCL refuses on one GPU:
    backend auto picks gloo there, an explicit nccl is refused naming the key; its memory share
    defaulted and bounded as SGLang's, set without Hydra's ``+`` as SGLang's flags are; an
    adapter goes as a directory (path disk) on any GPU layout, never to a second node."""
    one = ["topology=gpu_vllm", "launch.gpus_per_node=1"]
    with pytest.raises(ConfigError, match=r"^trainer\.weight_sync\.backend=nccl with rollout\."
                                          r"engine\.kind=vllm.*backend=auto \(gloo there\)"):
        place_nodes(load_config([*one, "trainer.weight_sync.backend=nccl"]))
    for given in ([], ["trainer.weight_sync.backend=gloo"]):
        shared = with_weight_path(load_config([*one, *given]))
        assert shared.trainer.weight_sync.path == "distributed"
        assert shared.trainer.weight_sync.backend == "gloo"
        assert shared.rollout.engine.vllm["gpu_memory_utilization"] == SHARED_MEM_FRACTION_DEFAULT
    mine = with_weight_path(load_config([*one, "rollout.engine.vllm.gpu_memory_utilization=0.5",
                                         "rollout.engine.vllm.enforce_eager=true"]))
    assert mine.rollout.engine.vllm == {"gpu_memory_utilization": 0.5, "enforce_eager": True}
    apart = with_weight_path(load_config(["topology=gpu_vllm", "launch.gpus_per_node=2"]))
    assert apart.trainer.weight_sync.path == "distributed"
    assert "gpu_memory_utilization" not in apart.rollout.engine.vllm  # vLLM's own choice
    for util in ("0.9", "0", "'lots'"):
        with pytest.raises(ConfigError, match=r"^rollout\.engine\.vllm\.gpu_memory_utilization="):
            place_nodes(load_config([*one,
                                     f"rollout.engine.vllm.gpu_memory_utilization={util}"]))
    for gpus in ("1", "2"):
        lora = with_weight_path(load_config(["topology=gpu_vllm", "trainer.lora.rank=8",
                                             f"launch.gpus_per_node={gpus}"]))
        assert lora.trainer.weight_sync.path == "disk", gpus
    with pytest.raises(ConfigError, match=r"^trainer\.lora\.rank > 0 with rollout\.engine\.kind="
                                          r"vllm and launch\.nodes=2"):
        place_nodes(load_config(["topology=cpu_vllm", "trainer.lora.rank=8", "launch.nodes=2"]))
