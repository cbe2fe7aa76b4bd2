"""Pure placement: which ports and which CPU cores every daemon of a job gets.

``plan_topology(cfg, ports, cpus)`` takes the resolved ``RunConfig``, a source of free ports
and the usable core ids, and returns a ``Topology``: the buffer's request/reply and publish
addresses, a ``/metrics`` port per daemon, the torchrun rendezvous port and, when
``launch.pin_cpus`` is set, two disjoint core sets: the *rollout pool* (rollout servers and the
buffer, which only moves bytes) and the *trainer pool* (every trainer rank); on a GPU topology,
the GPUs of every daemon (``launch/placement.py``; the buffer gets none). No I/O happens here;
``launch/job.py`` feeds it ``free_ports()``, ``os.sched_getaffinity(0)`` and the GPU count.
``plan_lines`` renders a topology as ``areal-like plan`` prints it.

Invariants (tested in tests/unit/test_topology.py):
* every port in a topology is distinct, and a port fixed in the config (non-zero) is kept;
* with ``pin_cpus`` the two pools are non-empty and disjoint and together cover the cores given;
* nothing assumes localhost: the host part of ``buffer.address`` is kept as configured.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from areal_like.config import ConfigError, RunConfig
from launch.placement import place_job, visible_devices


@dataclass(frozen=True, kw_only=True)
class DaemonSlot:
    """One process the launcher starts: its name, kind, metrics port, pinned cores and GPUs."""

    name: str  # "buffer", "rollout-0", ..., "trainer"
    kind: str  # "buffer" | "rollout" | "trainer"
    metrics_port: int
    cpus: tuple[int, ...] | None  # None = not pinned
    overrides: tuple[str, ...] = ()  # extra `key=value` for this daemon's command line
    gpus: tuple[int, ...] | None = None  # its CUDA_VISIBLE_DEVICES; None = left as inherited (CPU topologies)


@dataclass(frozen=True, kw_only=True)
class Topology:
    host: str  # address the daemons use to reach each other
    buffer_address: str  # tcp://host:port (ROUTER)
    pub_address: str  # tcp://host:port (PUB)
    master_port: int  # torchrun rendezvous of the trainer ranks
    slots: tuple[DaemonSlot, ...]
    rollout_cpus: tuple[int, ...] | None
    trainer_cpus: tuple[int, ...] | None

    def slot(self, name: str) -> DaemonSlot:
        for s in self.slots:
            if s.name == name:
                return s
        raise KeyError(name)

    def ports(self) -> dict[str, int]:
        """Every port of the job by role (what ``ports.json`` records)."""
        router = int(self.buffer_address.rsplit(":", 1)[1])
        pub = int(self.pub_address.rsplit(":", 1)[1])
        out = {"buffer_router": router, "buffer_pub": pub, "trainer_master": self.master_port}
        out.update({f"{s.name}_metrics": s.metrics_port for s in self.slots})
        return out

    def to_json(self) -> dict:
        return {
            "host": self.host, "buffer_address": self.buffer_address, "pub_address": self.pub_address,
            "master_port": self.master_port,
            "rollout_cpus": list(self.rollout_cpus) if self.rollout_cpus is not None else None,
            "trainer_cpus": list(self.trainer_cpus) if self.trainer_cpus is not None else None,
            "daemons": [{"name": s.name, "kind": s.kind, "metrics_port": s.metrics_port,
                         "cpus": list(s.cpus) if s.cpus is not None else None,
                         "gpus": list(s.gpus) if s.gpus is not None else None,
                         "metrics_url": f"http://{self.host}:{s.metrics_port}/metrics"} for s in self.slots],
        }


def split_address(address: str) -> tuple[str, int]:
    """``tcp://host:port`` -> (host, port). Raises ConfigError on anything else."""
    if not address.startswith("tcp://") or ":" not in address[len("tcp://"):]:
        raise ConfigError(f"{address!r} is not a tcp://host:port address")
    host, port = address[len("tcp://"):].rsplit(":", 1)
    try:
        return host, int(port)
    except ValueError:
        raise ConfigError(f"{address!r}: port {port!r} is not a number") from None


def split_cpus(cpus: Iterable[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Disjoint (rollout pool, trainer pool): the first half (at least one) and the rest.

    The trainer gets the larger half on odd counts because its ranks are the bottleneck in
    compute-bound CPU runs; on GPU nodes the pools are GPUs and this split is not used.
    """
    cores = tuple(sorted(set(cpus)))
    if len(cores) < 2:
        raise ConfigError(f"launch.pin_cpus=true needs at least 2 cores, have {list(cores)}")
    k = len(cores) // 2
    return cores[:k], cores[k:]


def _unique(ports: Iterable[int], taken: set[int]) -> Iterator[int]:
    for p in ports:
        if p not in taken:
            taken.add(p)
            yield p


def plan_topology(cfg: RunConfig, ports: Iterable[int], cpus: Iterable[int] | None = None) -> Topology:
    """Assign every port left at 0 from ``ports`` (skipping duplicates and fixed ports), and the
    GPUs of ``launch/placement.py`` when a process runs on one (``launch.gpus_per_node`` resolved).

    Rollout server i gets ``rollout.metrics_port + i`` when that is fixed, so a Prometheus
    static config can list them; the trainer's port is rank 0's.
    """
    host, router = split_address(cfg.buffer.address)
    pub_host, pub = split_address(cfg.buffer.pub_address)
    n_roll = cfg.launch.num_rollout_servers
    fixed = {p for p in (router, pub, cfg.buffer.metrics_port, cfg.trainer.metrics_port) if p}
    if cfg.rollout.metrics_port:
        fixed |= {cfg.rollout.metrics_port + i for i in range(n_roll)}
    n_fixed = sum(1 for p in (router, pub, cfg.buffer.metrics_port, cfg.trainer.metrics_port) if p)
    n_fixed += n_roll if cfg.rollout.metrics_port else 0
    if len(fixed) != n_fixed:
        raise ConfigError("two daemons are configured with the same fixed port")
    placed = place_job(cfg)  # before any port is taken: a refused layout costs nothing
    no_gpu = () if placed is not None else None  # a GPU topology hides the GPUs from CPU-only daemons
    source = _unique(ports, set(fixed))

    def pick(p: int) -> int:
        return p if p else next(source)

    router, pub = pick(router), pick(pub)
    rollout_cpus = trainer_cpus = None
    if cfg.launch.pin_cpus:
        rollout_cpus, trainer_cpus = split_cpus(cpus if cpus is not None else ())
    slots = [DaemonSlot(name="buffer", kind="buffer", metrics_port=pick(cfg.buffer.metrics_port), cpus=rollout_cpus,
                        gpus=no_gpu)]
    for i in range(n_roll):
        port = cfg.rollout.metrics_port + i if cfg.rollout.metrics_port else next(source)
        evaluates = ("rollout.eval=true",) if i == 0 and wants_eval(cfg) else ()  # the first server evaluates
        slots.append(DaemonSlot(name=f"rollout-{i}", kind="rollout", metrics_port=port, cpus=rollout_cpus,
                                overrides=(f"rollout.server_id=rollout-{i}", f"rollout.metrics_port={port}",
                                           *evaluates),
                                gpus=placed.rollout[i] if placed is not None and placed.rollout else no_gpu))
    slots.append(DaemonSlot(name="trainer", kind="trainer", metrics_port=pick(cfg.trainer.metrics_port),
                            cpus=trainer_cpus, gpus=placed.trainer if placed is not None else None))
    return Topology(host=host, buffer_address=f"tcp://{host}:{router}", pub_address=f"tcp://{pub_host}:{pub}",
                    master_port=next(source), slots=tuple(slots), rollout_cpus=rollout_cpus,
                    trainer_cpus=trainer_cpus)


def wants_eval(cfg: RunConfig) -> bool:
    """Whether the job evaluates at all: an eval is scheduled and the task has an eval split."""
    from areal_like.tasks import has_eval_split

    return (cfg.eval.every > 0 or cfg.eval.at_end) and has_eval_split(cfg.task)


def apply_topology(cfg: RunConfig, topo: Topology) -> RunConfig:
    """The config every daemon reads: addresses and metrics ports filled in (a new object)."""
    buffer = dataclasses.replace(cfg.buffer, address=topo.buffer_address, pub_address=topo.pub_address,
                                 metrics_port=topo.slot("buffer").metrics_port)
    rollout = dataclasses.replace(cfg.rollout, buffer_address=topo.buffer_address, pub_address=topo.pub_address)
    trainer = dataclasses.replace(cfg.trainer, buffer_address=topo.buffer_address,
                                  metrics_port=topo.slot("trainer").metrics_port)
    return dataclasses.replace(cfg, buffer=buffer, rollout=rollout, trainer=trainer)


def plan_lines(cfg: RunConfig, topo: Topology) -> list[str]:
    """``areal-like plan``: a header, then one line per process of ``topo`` (planned from ``cfg``):
    node, name, GPUs (its CUDA_VISIBLE_DEVICES; ``-`` = inherited, ``none`` = hidden) and where it
    listens or connects. A port ``cfg`` leaves at 0 shows as ``auto``: ``run`` picks it when it starts
    (the torchrun rendezvous port: at each start), so a number picked now would not be the one used."""
    ws = cfg.trainer.weight_sync
    backend = ws.backend if ws.backend != "auto" else ("nccl" if cfg.trainer.device.startswith("cuda") else "gloo")
    gpus = {s.kind: set(s.gpus or ()) for s in topo.slots if s.kind != "rollout"}
    shared = any(gpus["trainer"] & set(s.gpus or ()) for s in topo.slots if s.kind == "rollout")
    path = ws.path if ws.path != "auto" else ("tensor" if shared else "distributed")  # as with_weight_path
    fixed_metrics = {"buffer": cfg.buffer.metrics_port, "rollout": cfg.rollout.metrics_port,
                     "trainer": cfg.trainer.metrics_port}
    rows = [("node", "process", "gpus", "ports and addresses")]
    for s in topo.slots:
        metrics = f"metrics {topo.host}:{_port(fixed_metrics[s.kind], s.metrics_port)}"
        if s.kind == "buffer":
            where = f"router {_addr(cfg.buffer.address)}  pub {_addr(cfg.buffer.pub_address)}  {metrics}"
        elif s.kind == "rollout":
            where = f"{metrics}  {_engine(cfg)}"
        else:
            ranks = f"{cfg.launch.trainer_ranks} ranks" + (" (LOCAL_RANK i: the i-th GPU)" if s.gpus else "")
            where = (f"{metrics} (rank 0)  torchrun {ranks} rendezvous {topo.host}:auto  "
                     + (f"weight sync {backend} {ws.master_addr}:{_port(ws.master_port)}" if path == "distributed"
                        else f"weight sync {path} (no group)"))
        rows.append(("0", s.name, "-" if s.gpus is None else (visible_devices(s.gpus) or "none"), where))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    return [f"{a:<{width[0]}}  {b:<{width[1]}}  {c:<{width[2]}}  {d}" for a, b, c, d in rows]


def _port(configured: int, planned: int | None = None) -> str:
    return "auto" if not configured else str(planned if planned is not None else configured)


def _addr(address: str) -> str:
    host, port = split_address(address)
    return f"tcp://{host}:{_port(port)}"


def _engine(cfg: RunConfig) -> str:
    ec = cfg.rollout.engine
    if ec.kind == "url":
        return f"engine {ec.url}"
    if ec.kind == "embedded":
        return f"engine embedded on {ec.device}"
    return f"engine sglang tp={ec.tp_size} http://{ec.host}:{_port(ec.port)}"
