"""launch/srun.py: the Slurm job's srun steps come from the plan (GPUs, cores, node ranks), HEAD_IP
from a named interface (psutil's interfaces, faked, and the real `lo`), and the restart wrapper."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from areal_like.settings.config import ConfigError, load_config
from launch.job import plan_job
from launch.placement import place_node
from launch.srun import after, cpu_mask, head_ip, node_cores, physical_cores, slurm_steps

ROOT = Path(__file__).resolve().parents[2]


def _addr(family, address):
    return SimpleNamespace(family=family, address=address)


# psutil.net_if_addrs() on a node with eth0 (172.17.0.9), ib0 (10.1.2.3) and ib1 (IPv6 only)
FAKE_IFACES = {
    "lo": [_addr(socket.AF_INET, "127.0.0.1")],
    "eth0": [_addr(socket.AF_INET6, "fe80::1"), _addr(socket.AF_INET, "172.17.0.9")],
    "ib0": [_addr(socket.AF_INET, "10.1.2.3")],
    "ib1": [_addr(socket.AF_INET6, "fe80::2")],
}


@pytest.fixture
def fake_ifaces(monkeypatch):
    monkeypatch.setattr(psutil, "net_if_addrs", lambda: FAKE_IFACES)


def test_head_ip_is_the_named_interfaces_address(fake_ifaces):
    # not the first address `hostname -I` would give (172.17.0.9)
    assert head_ip("ib0") == "10.1.2.3"
    assert head_ip("eth0") == "172.17.0.9"


@pytest.mark.parametrize("iface,message", [
    ("", "no interface given (areal_like.sbatch: HEAD_IFACE is not set): name the one the "
         "other nodes reach this node on; "
         "this node has: lo=127.0.0.1, eth0=172.17.0.9, ib0=10.1.2.3"),
    # the interface as the user typed it: `head-ip eth7` has no HEAD_IFACE (review: it said
    # "HEAD_IFACE=eth7 is not an interface", a variable only the sbatch script has)
    ("eth7", "interface 'eth7' is not an interface of this node; "
             "interfaces with an IPv4 address here: lo=127.0.0.1, "
             "eth0=172.17.0.9, ib0=10.1.2.3"),
    ("ib1", "interface 'ib1' has no IPv4 address; "
            "interfaces with an IPv4 address here: lo=127.0.0.1, "
            "eth0=172.17.0.9, ib0=10.1.2.3"),
])
def test_head_ip_errors_name_the_interface_and_the_ones_there_are(fake_ifaces, iface, message):
    with pytest.raises(ConfigError) as e:
        head_ip(iface)
    assert str(e.value) == message


def test_an_address_with_an_alias_label_is_its_interfaces(monkeypatch):
    # getifaddrs names a labelled address "eth2:1"; `ip -o -4 addr show dev eth2` lists it
    monkeypatch.setattr(psutil, "net_if_addrs", lambda: {
        "eth2": [_addr(socket.AF_INET6, "fe80::3")], "eth2:1": [_addr(socket.AF_INET, "10.9.0.4")]})
    assert head_ip("eth2") == "10.9.0.4"


def test_the_sbatch_command_line_prints_the_address_or_one_error_line():
    """On the real loopback: the address, or one line naming the interfaces there are."""
    def head_ip_cli(*iface: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "launch.srun", "head-ip", *iface],
                              capture_output=True, text=True, timeout=120, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    ok, bad, typo = head_ip_cli("lo"), head_ip_cli(), head_ip_cli("lo7")
    assert (ok.returncode, ok.stdout) == (0, "127.0.0.1\n")
    assert (bad.returncode == 2 and bad.stdout == ""
            and bad.stderr.startswith("error: no interface given"))
    assert (typo.returncode == 2 and typo.stdout == ""
            and typo.stderr.startswith("error: interface 'lo7' is not an interface of this node; "
                                       "interfaces with an IPv4 address here: lo=127.0.0.1")
            and "HEAD_IFACE" not in typo.stderr), typo.stderr


def test_cores_follow_the_gpus_and_never_overlap():
    placed = place_node(gpus_per_node=8, trainer_ranks=4, rollout_servers=2, tp_size=2)
    # 32 for GPUs (4 each), 1 buffer
    cores = node_cores(placed, physical_cores(33), gpus_per_node=8, has_buffer=True)
    assert cores == {"trainer": tuple(range(16)), "rollout-0": tuple(range(16, 24)),
                     "rollout-1": tuple(range(24, 32)), "buffer": (32,)}
    assert cpu_mask(cores["rollout-0"]) == "0xff0000" and cpu_mask((0, 1)) == "0x3"
    with pytest.raises(ConfigError, match="^8 cores per node cannot give each of "
                                          "launch.gpus_per_node=8 GPUs a core "
                                          "beside the buffer's"):
        node_cores(placed, physical_cores(8), gpus_per_node=8, has_buffer=True)


def test_hyperthreads_stay_with_their_core_and_blocks_follow_sockets():
    """2 sockets x 4 cores x 2 threads, numbered as Linux does: core c's siblings are c and c + 8,
    socket 0 has cores 0-3. Two GPUs: each gets the four cores of one socket, both threads of
    each."""
    lscpu = "# CPU,Core,Socket\n" + "".join(f"{cpu},{cpu % 8},{(cpu % 8) // 4}\n"
                                            for cpu in range(16))
    cores = physical_cores(16, lscpu)
    assert cores[:2] == [(0, 8), (1, 9)] and len(cores) == 8
    placed = place_node(gpus_per_node=2, trainer_ranks=1, rollout_servers=1, tp_size=1)
    got = node_cores(placed, cores, gpus_per_node=2, has_buffer=False)
    assert got == {"trainer": (0, 8, 1, 9, 2, 10, 3, 11), "rollout-0": (4, 12, 5, 13, 6, 14, 7, 15)}
    # 7 cores left: 3 per GPU
    with_buffer = node_cores(placed, cores, gpus_per_node=2, has_buffer=True)
    assert with_buffer["buffer"] == (7, 15) and with_buffer["rollout-0"] == (3, 11, 4, 12, 5, 13)
    with pytest.raises(ConfigError, match="--cpu-topology: 'x,y' is not a"):
        physical_cores(4, "x,y\n")


def _cfg(nodes: int, tp: int, *extra: str):
    """What `areal-like config` prints for the sbatch's overrides: laid out (plan_job)."""
    gpus = 4
    trainer, servers = (2, (gpus - 2) // tp) if nodes == 1 else (gpus, gpus // tp)
    laid_out, _ = plan_job(load_config([
        "topology=gpu_sglang", "run_dir=/shared/run", f"launch.nodes={nodes}",
        f"launch.train_nodes={max(1, nodes - 1)}", f"launch.gpus_per_node={gpus}",
        f"launch.trainer_ranks={trainer}", f"launch.num_rollout_servers={servers}",
        f"rollout.engine.tp_size={tp}", "buffer.address=tcp://10.1.2.3:5555",
        "buffer.pub_address=tcp://10.1.2.3:5556", "trainer.weight_sync.master_addr=10.1.2.3",
        "buffer.metrics_port=9100", "rollout.metrics_port=9101", "trainer.metrics_port=9200",
        *extra]))
    return laid_out


def _steps(nodes: int, tp: int):
    hosts = [f"gpu{k}" for k in range(nodes)]
    return slurm_steps(_cfg(nodes, tp), hosts, config="/shared/run/config.yaml", cpus=17,
                       master_port=29500, restarts=3, repo="/shared/repo")


def _opts(argv) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in argv[:argv.index("env")]
                if a.startswith("--") and "=" in a)


@pytest.mark.parametrize("nodes", [1, 2, 3])
@pytest.mark.parametrize("tp", [1, 2])
def test_steps_place_every_process_of_the_plan(nodes, tp):
    topo, steps = _steps(nodes, tp)
    assert steps[0].kind == "buffer" and steps[0].argv[-4:] == (
        "areal-like", "buffer", "--config-file", "/shared/run/config.yaml")
    per_node: dict[str, list[int]] = {}
    for step in steps:
        opts = _opts(step.argv)
        assert step.argv[:2] == ("srun", "--overlap") and opts["nodes"] == opts["ntasks"] == "1"
        mask = int(opts["cpu-bind"].removeprefix("mask_cpu:"), 16)
        assert bin(mask).count("1") == int(opts["cpus-per-task"])
        per_node.setdefault(opts["nodelist"], []).append(mask)
        slot = topo.slot(step.name)
        assert opts["nodelist"] == f"gpu{slot.node}"
        assert step.argv[step.argv.index("env") + 1] == (
            f"CUDA_VISIBLE_DEVICES={','.join(map(str, slot.gpus))}")
    for masks in per_node.values():  # no two processes of a node share a core
        assert sum(masks) == sum(set(masks)) and all(a & b == 0 for i, a in enumerate(masks)
                                                     for b in masks[i + 1:])
    rollouts = [s for s in steps if s.kind == "rollout"]
    servers = (2 // tp) if nodes == 1 else (nodes - max(1, nodes - 1)) * (4 // tp)
    assert [s.name for s in rollouts] == [f"rollout-{j}" for j in range(servers)]
    assert all(f"rollout.server_id={s.name}" in s.argv and s.argv[s.argv.index("env") + 2:][:3] ==
               ("bash", "/shared/repo/launch/slurm/with_restarts.sh", "3") for s in rollouts)
    trainers = [s for s in steps if s.kind == "trainer"]
    assert len(trainers) == max(1, nodes - 1)
    for k, t in enumerate(trainers):
        tail = list(t.argv[t.argv.index("train") - 1:])
        assert tail == ["areal-like", "train", "--nnodes", str(max(1, nodes - 1)),
                        "--node-rank", str(k),
                        "--nproc-per-node", "2" if nodes == 1 else "4", "--master-addr", "10.1.2.3",
                        "--master-port", "29500", "--log-dir", f"/shared/run/logs/torchrun-node{k}",
                        "--config-file", "/shared/run/config.yaml",
                        # as run's trainer: the final eval's server may be late
                        "eval.await_server=true"]


def test_two_nodes_tp2_exact_command_lines():
    _, steps = _steps(2, 2)
    assert [s.line() for s in steps] == [
        "buffer\tbuffer\tsrun --overlap --nodes=1 --ntasks=1 --nodelist=gpu0 --cpus-per-task=1 "
        "--cpu-bind=mask_cpu:0x10000 "
        "env CUDA_VISIBLE_DEVICES= areal-like buffer --config-file /shared/run/config.yaml",
        "trainer\ttrainer\tsrun --overlap --nodes=1 --ntasks=1 --nodelist=gpu0 --cpus-per-task=16 "
        "--cpu-bind=mask_cpu:0xffff env CUDA_VISIBLE_DEVICES=0,1,2,3 areal-like train "
        "--nnodes 1 --node-rank 0 "
        "--nproc-per-node 4 --master-addr 10.1.2.3 --master-port 29500 "
        "--log-dir /shared/run/logs/torchrun-node0 "
        "--config-file /shared/run/config.yaml "
        "eval.await_server=true",
        "rollout-0\trollout\tsrun --overlap --nodes=1 --ntasks=1 --nodelist=gpu1 --cpus-per-task=8 "
        "--cpu-bind=mask_cpu:0xff env CUDA_VISIBLE_DEVICES=0,1 "
        "bash /shared/repo/launch/slurm/with_restarts.sh 3 "
        "areal-like rollout --config-file /shared/run/config.yaml rollout.server_id=rollout-0 "
        "rollout.metrics_port=9101 "
        "rollout.eval=true "  # the first server runs the job's evaluations
        # on its node's address, where trainer rank 0's log-prob guard reaches it
        "rollout.engine.host=gpu1",
        "rollout-1\trollout\tsrun --overlap --nodes=1 --ntasks=1 --nodelist=gpu1 --cpus-per-task=8 "
        "--cpu-bind=mask_cpu:0xff00 env CUDA_VISIBLE_DEVICES=2,3 "
        "bash /shared/repo/launch/slurm/with_restarts.sh 3 "
        "areal-like rollout --config-file /shared/run/config.yaml rollout.server_id=rollout-1 "
        "rollout.metrics_port=9102 "
        "rollout.engine.host=gpu1",
    ]


def test_ports_json_lists_each_daemon_at_its_nodes_address():
    topo, _ = _steps(3, 2)
    got = {d["name"]: d["metrics_url"] for d in topo.to_json(["gpu0", "gpu1", "gpu2"])["daemons"]}
    assert got == {"buffer": "http://10.1.2.3:9100/metrics",
                   "rollout-0": "http://gpu2:9101/metrics",
                   "rollout-1": "http://gpu2:9102/metrics",
                   "trainer": "http://10.1.2.3:9200/metrics"}


def test_steps_refuse_what_a_slurm_job_cannot_run():
    with pytest.raises(ConfigError,
                       match=r"^launch.nodes=2 but the allocation has 3 nodes \(a, b, c\)"):
        slurm_steps(_cfg(2, 1), ["a", "b", "c"], config="c", cpus=16, master_port=1, restarts=0,
                    repo="r")
    with pytest.raises(ConfigError, match="^rollout.metrics_port has port 0: "
                                          "every port of a Slurm job is fixed"):
        slurm_steps(_cfg(2, 1, "rollout.metrics_port=0"), ["a", "b"], config="c", cpus=16,
                    master_port=1, restarts=0, repo="r")
    with pytest.raises(ConfigError, match="the Slurm recipe places GPU jobs"):
        slurm_steps(load_config(["launch.nodes=2", "buffer.address=tcp://h:1",
                                 "buffer.pub_address=tcp://h:2",
                                 "trainer.weight_sync.master_addr=h",
                                 "buffer.metrics_port=3", "rollout.metrics_port=4",
                                 "trainer.metrics_port=5"]),
                    ["a", "b"], config="c", cpus=16, master_port=1, restarts=0, repo="r")


def test_with_restarts_restarts_a_failing_command_then_gives_up(tmp_path):
    count = tmp_path / "count"

    def with_restarts(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ROOT / "launch/slurm/with_restarts.sh"), "2", *command],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "RESTART_BACKOFF_S": "0"})
    r = with_restarts("bash", "-c", f"echo run >> {count}; exit 3")
    assert r.returncode == 3 and count.read_text() == "run\n" * 3
    assert "restart 2/2" in r.stderr and "no restarts left (2)" in r.stderr
    assert with_restarts("true").returncode == 0
    # exit 2: the daemon refused its settings (the local supervisor's REFUSED_EXIT), not restarted
    count.unlink()
    refused = with_restarts("bash", "-c", f"echo run >> {count}; exit 2")
    assert refused.returncode == 2 and count.read_text() == "run\n"
    assert "not restarted" in refused.stderr


def test_a_cpu_trainer_takes_the_cores_of_the_gpus_nothing_uses():
    # trainer.device=cpu
    placed = place_node(gpus_per_node=4, trainer_ranks=0, rollout_servers=2, tp_size=1)
    cores = node_cores(placed, physical_cores(17), gpus_per_node=4, has_buffer=True,
                       cpu_trainer=True)
    assert cores == {"rollout-0": (0, 1, 2, 3), "rollout-1": (4, 5, 6, 7),
                     "trainer": tuple(range(8, 16)), "buffer": (16,)}
    full = place_node(gpus_per_node=2, trainer_ranks=0, rollout_servers=2, tp_size=1)
    with pytest.raises(ConfigError, match="^trainer.device=cpu on a node whose 2 GPUs all serve"):
        node_cores(full, physical_cores(9), gpus_per_node=2, has_buffer=True, cpu_trainer=True)


def test_with_restarts_stops_at_once_on_sigterm_in_the_back_off_and_in_a_run(tmp_path):
    """A SIGTERM in the back-off was acted on only when the (foreground) sleep ended, and the trap
    signalled the reaped child's PID (another process's by then) or, before the first start, 0
    (the whole process group); it signals only live children now, the sleep included."""
    script = str(ROOT / "launch/slurm/with_restarts.sh")
    env = {**os.environ, "RESTART_BACKOFF_S": "600"}
    p = subprocess.Popen(["bash", script, "3", "bash", "-c", "exit 1"], stderr=subprocess.PIPE,
                         text=True, env=env, start_new_session=True)
    run = None
    try:
        assert "restart 1/3" in p.stderr.readline()  # in the back-off now
        p.terminate()
        assert p.wait(timeout=30) == 143
        with pytest.raises(ProcessLookupError):  # its group is gone: the sleep was stopped too
            os.killpg(p.pid, 0)
        log = tmp_path / "log"
        run = subprocess.Popen(["bash", script, "3", "bash", "-c",
                                f"trap 'echo term > {log}; exit 5' TERM; echo up; "
                                "while :; do sleep 0.05; done"], stdout=subprocess.PIPE,
                               text=True, env=env, start_new_session=True)
        assert run.stdout.readline() == "up\n"
        run.terminate()
        assert run.wait(timeout=30) == 143 and log.read_text() == "term\n"
    finally:
        for proc in (p, run):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf"])
def test_after_refuses_a_bad_timeout_in_one_line(value, capsys):
    assert after(["--timeout-s", value, "http://127.0.0.1:1/health", "--", "true"]) == 2
    assert capsys.readouterr().err == (f"error: --timeout-s: {value!r} is not a number of "
                                       "seconds >= 0\n")
