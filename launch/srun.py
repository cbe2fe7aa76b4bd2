"""The Slurm job's processes as ``srun`` steps, from the same plan ``areal-like plan`` prints.

``launch/slurm/areal_like.sbatch`` calls ``python -m launch.srun`` (launch/MULTINODE.md):

* ``head-ip IFACE``: the IPv4 address of ``IFACE`` on this node, which the other nodes reach;
* ``steps``: one ``name<TAB>kind<TAB>command`` line per process, in ``run``'s start order
  (``launch.job.start_stage``, waiting through ``after``), and ``ports.json``. The config must be
  the laid-out one ``areal-like config`` prints; one that is not is refused, naming the keys;
* ``after --timeout-s S URL... -- COMMAND``: exec ``COMMAND`` once every URL answers 200;
* ``final-eval --config-file F --pid P``: ``run``'s wait for the final evaluation.

Each step is ``srun --overlap ... --cpu-bind=mask_cpu:MASK env CUDA_VISIBLE_DEVICES=... COMMAND``:
a node's physical cores (``physical_cores``), less the buffer's on node 0, are cut into one block
per GPU in socket order and each process is bound to the blocks of its GPUs (``node_cores``), so
no two processes share a core; ``CUDA_VISIBLE_DEVICES`` is the plan's, set after Slurm's binding.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import shlex
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import psutil

from areal_like.settings.config import ConfigError, RunConfig, load_daemon_config
from launch.job import (
    engine_start_s,
    plan_job,
    shares_gpu,
    start_stage,
    trainer_overrides,
    wait_for_final_eval,
)
from launch.local import alive, probe
from launch.placement import NodeGpus, node_roles, place_nodes, trainer_on_gpu, visible_devices
from launch.topology import DaemonSlot, Topology, engine_address, split_address, wants_eval

BUFFER_CORES = 1  # the buffer moves bytes between sockets: one core is plenty


def head_ip(iface: str) -> str:
    """The first IPv4 address of ``iface`` on this node (an address with an alias label such as
    ``eth0:1`` is ``eth0``'s, as ``ip addr`` lists it); ConfigError saying what is missing."""
    found: dict[str, list[str]] = {}
    for name, addrs in psutil.net_if_addrs().items():
        found.setdefault(name.split(":")[0], []).extend(
            a.address for a in addrs if a.family == socket.AF_INET)
    have = ", ".join(f"{name}={ips[0]}" for name, ips in found.items() if ips) or "none"
    if not iface:  # the sbatch script passes its HEAD_IFACE, empty when unset
        raise ConfigError("no interface given (areal_like.sbatch: HEAD_IFACE is not set): name "
                          f"the one the other nodes reach this node on; this node has: {have}")
    if not found.get(iface):
        why = "has no IPv4 address" if iface in found else "is not an interface of this node"
        raise ConfigError(f"interface {iface!r} {why}; interfaces with an IPv4 address here: "
                          f"{have}")
    return found[iface][0]


def physical_cores(cpus: int, lscpu: str | None = None) -> list[tuple[int, ...]]:
    """The node's physical cores, each as its logical CPUs (hyperthreads are numbered apart),
    ordered by (socket, core), from ``lscpu -p=CPU,CORE,SOCKET``; without it each of ``cpus``
    logical CPUs is a core of its own."""
    if not lscpu:
        return [(c,) for c in range(cpus)]
    by_core: dict[tuple[int, int], list[int]] = {}
    for line in lscpu.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        try:
            cpu, core, sock = (int(x or 0) for x in line.split(",")[:3])
        except ValueError:
            raise ConfigError(f"--cpu-topology: {line!r} "
                              "is not a `lscpu -p=CPU,CORE,SOCKET` line") from None
        by_core.setdefault((sock, core), []).append(cpu)
    return [tuple(sorted(by_core[k])) for k in sorted(by_core)]


def node_cores(placed: NodeGpus, cores: list[tuple[int, ...]], gpus_per_node: int,
               has_buffer: bool, cpu_trainer: bool = False) -> dict[str, tuple[int, ...]]:
    """The logical CPUs of ``trainer``, ``rollout-<i>`` (i-th server of the node) and ``buffer``
    (the last core) on one node; a trainer on CPU (``cpu_trainer``) takes the blocks of the GPUs
    no process uses. ConfigError when a GPU gets no core, or a CPU trainer no block."""
    usable = cores[:len(cores) - BUFFER_CORES] if has_buffer else cores
    per_gpu = len(usable) // gpus_per_node
    if per_gpu < 1:
        raise ConfigError(f"{len(cores)} cores per node cannot give each of "
                          f"launch.gpus_per_node={gpus_per_node} "
                          "GPUs a core" + (" beside the buffer's" if has_buffer else ""))

    def block(gpus: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(c for g in gpus for core in usable[g * per_gpu:(g + 1) * per_gpu]
                     for c in core)

    out = {f"rollout-{i}": block(g) for i, g in enumerate(placed.rollout)}
    if placed.trainer:
        out["trainer"] = block(placed.trainer)
    elif cpu_trainer:
        if placed.used >= gpus_per_node:
            raise ConfigError(f"trainer.device=cpu on a node whose {gpus_per_node} GPUs all serve: "
                              "the trainer takes the cores of a GPU no process uses; lower "
                              "launch.num_rollout_servers")
        out["trainer"] = block(tuple(range(placed.used, gpus_per_node)))
    if has_buffer:
        out["buffer"] = tuple(c for core in cores[len(cores) - BUFFER_CORES:] for c in core)
    return out


def cpu_mask(cores: tuple[int, ...]) -> str:
    """Slurm's ``mask_cpu`` value for ``cores`` (bit i = core i)."""
    return hex(sum(1 << c for c in cores))


@dataclass(frozen=True)
class Step:
    name: str  # the plan's process name (its log is <name>.log)
    kind: str  # buffer | rollout | trainer
    argv: tuple[str, ...]

    def line(self) -> str:
        return f"{self.name}\t{self.kind}\t{shlex.join(self.argv)}"


def slurm_steps(cfg: RunConfig, hosts: list[str], *, config: str, cpus: int, master_port: int,
                restarts: int, repo: str, lscpu: str | None = None) -> tuple[Topology, list[Step]]:
    """The plan of ``cfg`` on ``hosts`` (node k = ``hosts[k]``) as srun steps, buffer first;
    ``cpus`` logical CPUs per node, ``lscpu`` their cores and sockets (``physical_cores``)."""
    la = cfg.launch
    if len(hosts) != la.nodes:
        raise ConfigError(f"launch.nodes={la.nodes} but the allocation has {len(hosts)} nodes "
                          f"({', '.join(hosts)})")
    for key, port in (("buffer.address", split_address(cfg.buffer.address)[1]),
                      ("buffer.pub_address", split_address(cfg.buffer.pub_address)[1]),
                      ("buffer.metrics_port", cfg.buffer.metrics_port),
                      ("trainer.metrics_port", cfg.trainer.metrics_port),
                      ("rollout.metrics_port", cfg.rollout.metrics_port)):
        if not port:
            raise ConfigError(f"{key} has port 0: every port of a Slurm job is fixed in its config "
                              "(ports.json lists them for `areal-like top` and Prometheus)")
    if teacher := next((t for t in cfg.distill.teachers if not cfg.distill.is_url(t)), None):
        raise ConfigError(f"distill.teachers: {teacher!r} (a model directory): a Slurm job starts "
                          "no teacher process; give the URL of an engine serving it")
    placed = place_nodes(cfg)
    if placed is None:
        raise ConfigError(f"trainer.device={cfg.trainer.device!r} and "
                          f"rollout.engine.kind={cfg.rollout.engine.kind!r}: "
                          "the Slurm recipe places GPU jobs (topology=gpu_sglang or gpu_embedded)")
    laid, topo = plan_job(cfg, ports=itertools.count(master_port))
    check_laid_out(cfg, laid)
    node = physical_cores(cpus, lscpu)
    cpu_trainer = not trainer_on_gpu(cfg)  # on the training nodes, beside the engines' GPUs
    cores = [node_cores(placed[k], node, la.gpus_per_node, has_buffer=k == 0,
                        cpu_trainer=cpu_trainer and node_roles(la.nodes, la.train_nodes, k)[0])
             for k in range(la.nodes)]
    seen = [0] * la.nodes  # rollout servers placed so far on each node
    steps = []
    for slot in sorted(topo.slots, key=lambda s: (s.kind != "buffer", s.node)):
        key = slot.kind if slot.kind != "rollout" else f"rollout-{seen[slot.node]}"
        seen[slot.node] += slot.kind == "rollout"
        srun = ["srun", "--overlap", "--nodes=1", "--ntasks=1", f"--nodelist={hosts[slot.node]}",
                f"--cpus-per-task={len(cores[slot.node][key])}",
                f"--cpu-bind=mask_cpu:{cpu_mask(cores[slot.node][key])}",
                "env", f"CUDA_VISIBLE_DEVICES={visible_devices(slot.gpus or ())}"]
        wait = _after(cfg, topo, slot, hosts)
        command = daemon_command(cfg, topo, slot, config, hosts[slot.node], restarts, repo)
        steps.append(Step(slot.name, slot.kind, (*srun, *wait, *command)))
    return topo, steps


def check_laid_out(cfg: RunConfig, laid: RunConfig) -> None:
    """ConfigError naming the keys where ``cfg`` is not the laid-out config ``laid``."""
    if cfg == laid:
        return
    keys = ["run_dir"] if cfg.run_dir != laid.run_dir else []
    keys += [f"{part}.{f.name}" for part in ("launch", "buffer", "rollout", "trainer", "security")
             for f in dataclasses.fields(getattr(cfg, part))
             if getattr(getattr(cfg, part), f.name) != getattr(getattr(laid, part), f.name)]
    raise ConfigError(f"the config is not laid out for its launch.* layout ({', '.join(keys)} "
                      "differ from what `areal-like run` gives its daemons): make it with "
                      "`areal-like config`")


def _after(cfg: RunConfig, topo: Topology, slot: DaemonSlot, hosts: list[str]) -> list[str]:
    """A step started after the previous stage (``launch.job.start_stage``) waits for its health."""
    shared = shares_gpu(cfg)
    stage = start_stage(slot.kind, shared)
    if stage < 2:  # the buffer's stage-0 wait is the sbatch script's
        return []
    urls = [f"http://{topo.host if s.node == 0 else hosts[s.node]}:{s.metrics_port}/health"
            for s in topo.slots if start_stage(s.kind, shared) == stage - 1]
    wait_s = str(int(engine_start_s(cfg)))
    return ["python", "-m", "launch.srun", "after", "--timeout-s", wait_s, *urls, "--"]


def daemon_command(cfg: RunConfig, topo: Topology, slot: DaemonSlot, config: str, host: str,
                   restarts: int | None = None, repo: str = "") -> list[str]:
    """The command of ``slot`` on the node whose address is ``host`` (the Slurm steps' and the Ray
    job's, ``launch/ray_job.py``); with ``restarts`` a rollout server runs under
    ``launch/slurm/with_restarts.sh`` (from the checkout ``repo``), which restarts it in place."""
    if slot.kind == "buffer":
        return ["areal-like", "buffer", "--config-file", config]
    if slot.kind == "rollout":
        address = engine_address(cfg, host)
        engine = [] if address == cfg.rollout.engine.host else [f"rollout.engine.host={address}"]
        wrap = ([] if restarts is None
                else ["bash", f"{repo}/launch/slurm/with_restarts.sh", str(restarts)])
        return [*wrap, "areal-like", "rollout", "--config-file", config, *slot.overrides, *engine]
    return ["areal-like", "train", "--nnodes", str(cfg.launch.train_nodes),
            "--node-rank", str(slot.node),
            "--nproc-per-node", str(cfg.launch.trainer_ranks), "--master-addr", topo.host,
            "--master-port", str(topo.master_port),
            # torchrun's own files (without a folder it leaves one in /tmp at every start)
            "--log-dir", str(Path(cfg.run_dir) / "logs" / f"torchrun-node{slot.node}"),
            "--config-file", config, *trainer_overrides(cfg)]


def after(argv: list[str]) -> int:
    """``after --timeout-s S URL... -- COMMAND...``: exec COMMAND once every URL is healthy."""
    if len(argv) < 4 or argv[0] != "--timeout-s" or "--" not in argv or argv[-1] == "--":
        print("usage: python -m launch.srun after --timeout-s S URL... -- COMMAND...",
              file=sys.stderr)
        return 2
    cut = argv.index("--")
    try:
        wait_s = float(argv[1])
    except ValueError:
        wait_s = math.nan
    if not 0 <= wait_s < math.inf:
        print(f"error: --timeout-s: {argv[1]!r} is not a number of seconds >= 0", file=sys.stderr)
        return 2
    deadline = time.monotonic() + wait_s
    for url in argv[2:cut]:
        while not probe(url, timeout_s=5):
            if time.monotonic() >= deadline:
                print(f"error: {url} did not answer within {argv[1]} s; "
                      f"not starting {argv[cut + 1]}",
                      file=sys.stderr)
                return 1
            time.sleep(2.0)
    os.execvp(argv[cut + 1], argv[cut + 1:])


def final_eval(cfg: RunConfig, pid: int, poll_s: float = 1.0) -> int:
    """``run``'s wait for the final evaluation (``launch.job.wait_for_final_eval``) for a Slurm
    job."""
    if not (wants_eval(cfg) and cfg.eval.at_end):
        return 0
    # the evaluating server's step as the wait reads a supervisor, with a stop event nobody sets
    step = SimpleNamespace(pids=lambda: {"rollout-0": pid if alive(pid) else None},
                           stop_event=threading.Event())
    return 0 if wait_for_final_eval(cfg, Path(cfg.run_dir), step, poll_s) else 1


def main(argv: list[str]) -> int:
    if argv[:1] == ["after"]:
        return after(argv[1:])
    if argv[:1] == ["final-eval"] and len(argv) == 5 and argv[1::2] == ["--config-file", "--pid"]:
        return final_eval(load_daemon_config(["--config-file", argv[2]]), int(argv[4]))
    ap = argparse.ArgumentParser(prog="python -m launch.srun", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    hp = sub.add_parser("head-ip", help="the IPv4 address of an interface of this node")
    hp.add_argument("iface", nargs="?", default="")
    sp = sub.add_parser("steps", help="one srun step per process of the plan (name, kind, command)")
    sp.add_argument("--config-file", required=True)
    sp.add_argument("--hosts", required=True,
                    help="comma-separated, node 0 first (scontrol show hostnames)")
    sp.add_argument("--cpus-per-node", type=int, required=True)
    sp.add_argument("--cpu-topology",
                    help="a file with `lscpu -p=CPU,CORE,SOCKET` of a node (SMT and sockets)")
    sp.add_argument("--master-port", type=int, required=True,
                    help="torchrun's rendezvous on node 0")
    sp.add_argument("--restarts", type=int, default=3,
                    help="per rollout server, before its step fails")
    sp.add_argument("--repo", required=True, help="this checkout on the shared filesystem")
    sp.add_argument("--ports-json", help="write ports.json here")
    args = ap.parse_args(argv)
    try:
        if args.command == "head-ip":
            print(head_ip(args.iface))
            return 0
        cfg = load_daemon_config(["--config-file", args.config_file])
        hosts = args.hosts.split(",")
        topo, steps = slurm_steps(cfg, hosts, config=args.config_file, cpus=args.cpus_per_node,
                                  master_port=args.master_port, restarts=args.restarts,
                                  repo=args.repo,
                                  lscpu=(Path(args.cpu_topology).read_text()
                                         if args.cpu_topology else None))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.ports_json:
        Path(args.ports_json).write_text(json.dumps(topo.to_json(hosts), indent=2))
    print("\n".join(step.line() for step in steps))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
