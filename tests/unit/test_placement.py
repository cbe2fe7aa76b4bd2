"""launch/placement.py, the launcher's CUDA_VISIBLE_DEVICES and `areal-like plan`."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
from pathlib import Path

import pytest

from areal_like.settings.config import ConfigError, load_config
from launch.job import job_specs
from launch.placement import check_one_node, idle_gpus, place_node, place_nodes
from launch.topology import apply_topology, plan_topology
from tests.conftest import run_cli

CLUSTER = ("buffer.address=tcp://10.0.0.1:5555", "buffer.pub_address=tcp://10.0.0.1:5556",
           # what other nodes dial: node 0 on the cluster network
           "trainer.weight_sync.master_addr=10.0.0.1")


@pytest.mark.parametrize("gpus,trainer,servers,tp,want_trainer,want_rollout", [
    (2, 1, 1, 1, (0,), ((1,),)),
    (4, 2, 2, 1, (0, 1), ((2,), (3,))),
    (4, 2, 1, 2, (0, 1), ((2, 3),)),
    (8, 4, 2, 2, (0, 1, 2, 3), ((4, 5), (6, 7))),
    (8, 2, 3, 2, (0, 1), ((2, 3), (4, 5), (6, 7))),
    (8, 1, 1, 4, (0,), ((1, 2, 3, 4),)),  # GPUs 5-7 stay idle
])
def test_one_node_layouts(gpus, trainer, servers, tp, want_trainer, want_rollout):
    p = place_node(gpus_per_node=gpus, trainer_ranks=trainer, rollout_servers=servers, tp_size=tp)
    assert (p.trainer, p.rollout) == (want_trainer, want_rollout)
    assert p.used == trainer + servers * tp


@pytest.mark.parametrize("gpus,trainer,servers,tp,need", [
    (1, 1, 2, 1, 3),  # one GPU is shared by one trainer rank and one rollout server only
    (1, 2, 1, 1, 3),
    (2, 2, 1, 1, 3),
    (4, 2, 2, 2, 6),
    (8, 2, 4, 2, 10),
])
def test_a_layout_over_the_gpus_is_refused_with_the_keys_and_numbers(
        gpus, trainer, servers, tp, need):
    with pytest.raises(ConfigError) as e:
        place_node(gpus_per_node=gpus, trainer_ranks=trainer, rollout_servers=servers, tp_size=tp)
    assert str(e.value).startswith(f"launch.trainer_ranks={trainer} + "
                                   f"launch.num_rollout_servers={servers} x "
                                   f"rollout.engine.tp_size={tp} needs {need} GPUs per node; "
                                   f"launch.gpus_per_node={gpus}: one process per GPU")
    assert ("only a one-GPU node with one trainer rank and one rollout server" in str(e.value)
            and "NCCL" in str(e.value))


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
@pytest.mark.parametrize("nodes,train_nodes,tp", [(2, 1, 1), (3, 1, 2), (3, 2, 1), (3, 2, 4)])
def test_several_nodes_node_by_node(gpus, nodes, train_nodes, tp):
    """Training nodes carry only trainer ranks, the others only rollout servers (sbatch's)."""
    if tp > gpus:
        pytest.skip("an engine wider than the node")
    plans = place_nodes(load_config([
        "topology=gpu_sglang", f"launch.gpus_per_node={gpus}", f"launch.nodes={nodes}",
        f"launch.train_nodes={train_nodes}", f"launch.trainer_ranks={gpus}",
        f"launch.num_rollout_servers={gpus // tp}", f"rollout.engine.tp_size={tp}", *CLUSTER]))
    assert len(plans) == nodes
    for k, p in enumerate(plans):
        assert p.used == gpus
        if k < train_nodes:
            assert p.trainer == tuple(range(gpus)) and p.rollout == ()
        else:
            assert p.trainer == () and p.rollout == tuple(tuple(range(i, i + tp))
                                                          for i in range(0, gpus, tp))


def test_several_nodes_refusals():
    base = ["topology=gpu_sglang", "launch.gpus_per_node=8", "launch.nodes=3",
            "launch.train_nodes=1", *CLUSTER]
    with pytest.raises(ConfigError, match=r"^launch.num_rollout_servers=5 x "
                                          r"rollout.engine.tp_size=2 needs 10 GPUs "
                                          r"per node \(node 1 of 3\); launch.gpus_per_node=8"):
        place_nodes(load_config([*base, "launch.num_rollout_servers=5",
                                 "rollout.engine.tp_size=2"]))
    with pytest.raises(ConfigError,
                       match=r"^launch.trainer_ranks=9 needs 9 GPUs per node \(node 0 of 3\)"):
        place_nodes(load_config([*base, "launch.trainer_ranks=9"]))
    with pytest.raises(ConfigError, match="launch.train_nodes=3 is invalid: "
                                          "must be >= 1 and < launch.nodes=3"):
        load_config(["launch.nodes=3", "launch.train_nodes=3"])
    with pytest.raises(ConfigError, match="launch.train_nodes=2 is invalid: must be 1 on one node"):
        load_config(["launch.train_nodes=2"])
    with pytest.raises(ConfigError, match="launch.nodes=3: `areal-like run` starts one node"):
        check_one_node(load_config(base))
    with pytest.raises(ConfigError, match=r"^launch.num_rollout_servers=3 x "
                                          r"rollout.engine.tp_size=2 needs 6 GPUs "
                                          r"per node \(node 2 of 3\); launch.gpus_per_node=4"):
        place_node(gpus_per_node=4, trainer_ranks=0, rollout_servers=3, tp_size=2, nodes=3, node=2)
    with pytest.raises(ConfigError, match="rollout.engine.tp_size=2 is invalid"):
        load_config(["rollout.engine.tp_size=2"])  # the embedded engine is one device
    with pytest.raises(ConfigError, match="launch.gpus_per_node=-1"):
        load_config(["launch.gpus_per_node=-1"])


def test_place_nodes_reads_the_config_and_cpu_topologies_take_no_gpu():
    assert place_nodes(load_config(["launch.gpus_per_node=8"])) is None  # the default: CPU
    (sg,) = place_nodes(load_config(["topology=gpu_sglang", "launch.gpus_per_node=4",
                                "launch.trainer_ranks=2",
                                "launch.num_rollout_servers=1", "rollout.engine.tp_size=2"]))
    assert (sg.trainer, sg.rollout) == ((0, 1), ((2, 3),))
    # the trainer on CPU (backend=auto: gloo), the embedded engines on the GPUs
    (mixed,) = place_nodes(load_config(["topology=gpu_embedded", "trainer.device=cpu",
                                        "launch.gpus_per_node=2",
                                        "launch.num_rollout_servers=2"]))
    assert (mixed.trainer, mixed.rollout) == ((), ((0,), (1,)))
    with pytest.raises(ConfigError,
                       match=r"^trainer.weight_sync.backend=nccl with trainer.device='cpu'"):
        place_nodes(load_config(["topology=gpu_embedded", "trainer.device=cpu",
                                 "launch.gpus_per_node=2", "trainer.weight_sync.backend=nccl"]))
    with pytest.raises(ConfigError, match="need GPUs, and torch sees none here"):
        place_nodes(load_config(["topology=gpu_embedded"]))
    # the CPU default with SGLang: only the engine needs a GPU (not the CPU trainer)
    with pytest.raises(ConfigError, match=r"^rollout.engine.kind=sglang \(without rollout.engine"
                                          r".sglang.device=cpu: SGLang on CPU is "
                                          r"topology=cpu_sglang\) needs GPUs"):
        place_nodes(load_config(["rollout.engine.kind=sglang"]))
    with pytest.raises(ConfigError, match="rollout.engine.device='cuda:1'"):
        place_nodes(load_config(["topology=gpu_embedded", "rollout.engine.device=cuda:1",
                                 "launch.gpus_per_node=4"]))


def test_gpus_the_counts_leave_unused_are_named_per_node():
    gpu = ["topology=gpu_sglang", "launch.gpus_per_node=8"]
    assert idle_gpus(load_config(gpu)) == (
        "GPUs left unused: 6 of 8 on node 0; raise launch.trainer_ranks or "
        "launch.num_rollout_servers (each takes rollout.engine.tp_size)")
    assert idle_gpus(load_config([*gpu, "launch.trainer_ranks=4", "launch.num_rollout_servers=2",
                                  "rollout.engine.tp_size=2"])) is None
    # two nodes: the training node is full, the engines' node has 2 GPUs over 2 x tp 3
    assert idle_gpus(load_config([*gpu, "launch.nodes=2", "launch.train_nodes=1",
                                  "launch.trainer_ranks=8", "launch.num_rollout_servers=2",
                                  "rollout.engine.tp_size=3", *CLUSTER])
                     ).startswith("GPUs left unused: 2 of 8 on node 1;")
    assert idle_gpus(load_config(["launch.gpus_per_node=8"])) is None  # a CPU job takes none


def _specs(*overrides: str):
    cfg = load_config(list(overrides))
    topo = plan_topology(cfg, itertools.count(31000))
    return {s.name: s for s in job_specs(apply_topology(cfg, topo), topo, Path("/x/config.yaml"),
                                         python="py")}


def test_every_gpu_process_gets_its_own_cuda_visible_devices():
    specs = _specs("topology=gpu_sglang", "launch.gpus_per_node=8", "launch.trainer_ranks=4",
                   "launch.num_rollout_servers=2", "rollout.engine.tp_size=2")
    got = {name: s.env["CUDA_VISIBLE_DEVICES"] for name, s in specs.items()}
    assert got == {"buffer": "", "rollout-0": "4,5", "rollout-1": "6,7", "trainer": "0,1,2,3"}
    assert "--nproc-per-node" in specs["trainer"].argv() and specs["trainer"].argv()[6] == "4"
    assert specs["rollout-0"].env["OMP_NUM_THREADS"] == "1"  # the common environment is kept
    cpu = _specs("launch.gpus_per_node=8", "launch.num_rollout_servers=2", "launch.trainer_ranks=2")
    assert all("CUDA_VISIBLE_DEVICES" not in s.env for s in cpu.values())  # inherited on CPU


def test_an_inherited_cuda_visible_devices_is_translated_not_overwritten(monkeypatch):
    """A launcher given GPUs 4-7 plans indices 0-3 (what torch counts) and hands out 4-7."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    specs = _specs("topology=gpu_sglang", "launch.gpus_per_node=4", "launch.trainer_ranks=2",
                   "launch.num_rollout_servers=1", "rollout.engine.tp_size=2")
    assert {name: s.env["CUDA_VISIBLE_DEVICES"] for name, s in specs.items()} == \
        {"buffer": "", "rollout-0": "6,7", "trainer": "4,5"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a,GPU-b")  # UUIDs are entries like any other
    assert (_specs("topology=gpu_sglang", "launch.gpus_per_node=2")["rollout-0"]
            .env["CUDA_VISIBLE_DEVICES"] == "GPU-b")
    with pytest.raises(ConfigError, match=r"CUDA_VISIBLE_DEVICES='GPU-a,GPU-b' gives this "
                                          r"launcher 2 GPUs and the plan places a process on GPU "
                                          r"3 \(counted from 0\); unset it or set "
                                          r"launch.gpus_per_node=2"):
        _specs("topology=gpu_sglang", "launch.gpus_per_node=4", "launch.trainer_ranks=2",
               "launch.num_rollout_servers=1", "rollout.engine.tp_size=2")


@pytest.mark.parametrize("visible", ["abc", "0,abc", "-1"])
def test_an_inherited_cuda_visible_devices_cuda_cannot_read_is_refused(monkeypatch, visible):
    """CUDA reads no GPU from an entry that is not an index or a UUID (abc was one GPU)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with pytest.raises(ConfigError, match=rf"^CUDA_VISIBLE_DEVICES={visible!r}: "
                                          r"'(abc|-1)' is not a GPU index or UUID"):
        _specs("topology=gpu_sglang", "launch.gpus_per_node=1")
    r = _plan("topology=gpu_sglang", "launch.gpus_per_node=1",
              env={"CUDA_VISIBLE_DEVICES": visible})
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr  # plan refuses in one line
    assert r.stderr.startswith("error: ") and "is not a GPU index or UUID" in r.stderr, r.stderr


def test_one_shared_gpu_starts_the_trainer_after_the_engine():
    """SGLang sizes its KV cache from the memory free after loading: the trainer waits for it."""
    specs = _specs("topology=gpu_sglang", "launch.gpus_per_node=1")
    assert (specs["buffer"].stage, specs["rollout-0"].stage, specs["trainer"].stage) == (0, 1, 2)
    assert specs["rollout-0"].health_timeout_s > 600  # SGLang's own start-up allowance, plus margin
    two = _specs("topology=gpu_sglang", "launch.gpus_per_node=2")
    assert (two["rollout-0"].stage, two["trainer"].stage) == (1, 1)


@pytest.mark.parametrize("overrides,message", [
    (("launch.gpus_per_node=8", "trainer.weight_sync.path=tensor"),
     "trainer.weight_sync.path=tensor with the trainer and the engines on different GPUs"),
    (("launch.gpus_per_node=8", "launch.nodes=2", "trainer.weight_sync.path=disk", *CLUSTER),
     "trainer.weight_sync.path=disk with launch.nodes=2: the trainer writes to its own node's"),
    (("launch.gpus_per_node=8", "launch.nodes=2"),
     "buffer.address host '127.0.0.1' with launch.nodes=2"),
    (("launch.gpus_per_node=8", "launch.nodes=2", *CLUSTER[:2]),
     "trainer.weight_sync.master_addr host '127.0.0.1' with launch.nodes=2"),
    (("launch.gpus_per_node=8", "launch.nodes=2", *CLUSTER[:1],
      "buffer.pub_address=tcp://localhost:5556"),
     "buffer.pub_address host 'localhost'"),
    # trainer rank 0 drives each engine at the URL its rollout server registers
    (("launch.gpus_per_node=8", "launch.nodes=2", *CLUSTER, "rollout.engine.kind=url",
      "rollout.engine.url=http://127.0.0.1:30000"),
     "rollout.engine.url host '127.0.0.1' with launch.nodes=2"),
])
def test_layouts_a_gpu_run_would_hang_or_crash_on_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        place_nodes(load_config(["topology=gpu_sglang", *overrides]))


def layout_rows(stdout: str) -> list[str]:  # `plan`'s table, before the memory estimate
    return stdout.split("\n\n")[0].splitlines()


def _plan(*overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli("plan", *overrides, timeout=120,
                   env=None if env is None else {**os.environ, **env})


def test_plan_prints_one_line_per_process_and_starts_nothing(tmp_path):
    run_dir = tmp_path / "run"
    r = _plan("topology=gpu_sglang", "launch.gpus_per_node=8", "launch.trainer_ranks=4",
              "launch.num_rollout_servers=2", "rollout.engine.tp_size=2",
              "buffer.address=tcp://10.0.0.5:7000",
              "rollout.metrics_port=9101", f"run_dir={run_dir}")
    assert r.returncode == 0, r.stderr
    rows = [line.split(None, 3) for line in layout_rows(r.stdout)]
    assert rows[0] == ["node", "process", "gpus", "ports and addresses"]
    assert [row[:3] for row in rows[1:]] == [["0", "buffer", "none"], ["0", "rollout-0", "4,5"],
                                             ["0", "rollout-1", "6,7"], ["0", "trainer", "0,1,2,3"]]
    buffer, roll0, roll1, trainer = (row[3] for row in rows[1:])
    assert buffer.startswith("router tcp://10.0.0.5:7000  pub tcp://127.0.0.1:auto  "
                             "metrics 10.0.0.5:auto")
    assert roll0 == "metrics 10.0.0.5:9101  engine sglang tp=2 http://127.0.0.1:auto"
    assert roll1.startswith("metrics 10.0.0.5:9102")
    assert "torchrun 4 ranks" in trainer and "weight sync nccl 127.0.0.1:auto" in trainer
    assert not run_dir.exists()  # nothing written


def test_plan_prints_every_node_of_a_multi_node_job():
    r = _plan("topology=gpu_sglang", "launch.gpus_per_node=4", "launch.nodes=3",
              "launch.train_nodes=2",
              "launch.trainer_ranks=4", "launch.num_rollout_servers=2", "rollout.engine.tp_size=2",
              *CLUSTER, "rollout.metrics_port=9101", "trainer.metrics_port=9200")
    assert r.returncode == 0, r.stderr
    rows = [line.split(None, 3) for line in layout_rows(r.stdout)[1:]]
    assert [row[:3] for row in rows] == [["0", "buffer", "none"], ["0", "trainer", "0,1,2,3"],
                                         ["1", "trainer-n1", "0,1,2,3"], ["2", "rollout-0", "0,1"],
                                         ["2", "rollout-1", "2,3"]]
    assert ("torchrun node-rank 0 of 2, 4 ranks (LOCAL_RANK i: the i-th GPU), global 0..3"
            in rows[1][3])
    assert "metrics 10.0.0.1:9200 (rank 0)" in rows[1][3]
    assert rows[2][3] == ("torchrun node-rank 1 of 2, 4 ranks (LOCAL_RANK i: the i-th GPU), "
                          "global 4..7 "
                          "rendezvous 10.0.0.1:auto")
    assert (rows[3][3].startswith("metrics node2:9101  engine sglang tp=2")
            and rows[4][3].startswith("metrics node2:9102"))


def test_the_launchers_cuda_visible_devices_maps_one_node_only():
    """One node maps the launcher's GPUs; several nodes use the plan's own (launch/srun.py)."""
    one = _plan("topology=gpu_sglang", "launch.gpus_per_node=2",
                env={"CUDA_VISIBLE_DEVICES": "4,5"})
    assert one.returncode == 0, one.stderr
    assert "rollout-0  1 (=5)" in one.stdout and "trainer    0 (=4)" in one.stdout
    several = ("topology=gpu_sglang", "launch.gpus_per_node=4", "launch.nodes=2",
               "launch.trainer_ranks=4", "launch.num_rollout_servers=2", "rollout.engine.tp_size=2",
               *CLUSTER)
    want = _plan(*several)
    for visible in ("8,9,10,11", "4,5"):  # another node's GPUs; fewer than a node has
        got = _plan(*several, env={"CUDA_VISIBLE_DEVICES": visible})
        assert (got.returncode, got.stdout, got.stderr) == (0, want.stdout, "")


@pytest.mark.parametrize("layout", [
    ("launch.gpus_per_node=8", "launch.trainer_ranks=4", "launch.num_rollout_servers=4"),
    ("launch.gpus_per_node=2",),
    ("launch.gpus_per_node=4", "launch.nodes=3", "launch.train_nodes=1",
     "launch.trainer_ranks=4", "launch.num_rollout_servers=4", *CLUSTER),
])
def test_gpu_vllm_is_planned_and_placed_as_gpu_sglang(layout):
    """Same nodes' GPUs and, on one node, CUDA_VISIBLE_DEVICES, start stage and allowance."""
    vllm, sglang = (load_config([f"topology={t}", *layout]) for t in ("gpu_vllm", "gpu_sglang"))
    assert place_nodes(vllm) == place_nodes(sglang) is not None
    if "launch.nodes=3" in layout:
        return
    got = {t: {n: (s.env["CUDA_VISIBLE_DEVICES"], s.stage, s.health_timeout_s)
               for n, s in _specs(f"topology={t}", *layout).items()}
           for t in ("gpu_vllm", "gpu_sglang")}
    assert got["gpu_vllm"] == got["gpu_sglang"]


def test_gpu_vllm_launches_the_pinned_cuda_build_joining_the_trainers_nccl_group():
    from rollout_server.launch_vllm import VLLMProcess, version_problem

    cfg = load_config(["topology=gpu_vllm", "launch.gpus_per_node=2", "model.path=/m"])
    assert (cfg.rollout.engine.kind, cfg.rollout.engine.device) == ("vllm", "cuda")
    argv = VLLMProcess(cfg.model, cfg.rollout.engine).command("/tmp", {})[0]
    assert argv[argv.index("--weight-transfer-config") + 1] == '{"backend": "areal_nccl"}'
    assert argv[argv.index("--dtype") + 1] == "bfloat16"
    # this Python has vLLM's CPU build at most: the GPU job is refused naming its pin and extra
    assert re.search(r"kind=vllm on cuda needs vllm==0\.33\.0 .*pip install -e '\.\[gpu-vllm\]'",
                     version_problem("cuda"))
