"""Pure placement: which ports and which CPU cores (and, through ``launch/placement.py``, GPUs)
every daemon of a job gets; ``plan_lines`` renders it as ``areal-like plan`` prints it. No I/O:
``launch/job.py`` feeds it free ports, the usable cores and the GPU count.

Invariants (tested in tests/unit/test_topology.py):
* every port in a topology is distinct, and a port fixed in the config (non-zero) is kept;
* with ``pin_cpus`` the rollout pool (the servers) and the trainer pool (every trainer rank) are
  non-empty, disjoint and cover the cores given; the buffer, which only moves bytes, floats over
  both (benchmarks/README.md, "Layout choices");
* laid out from the cores (``laptop_layout``), no core gets more than one busy thread: one
  single-threaded server per core of the rollout pool, one trainer rank threading over the trainer
  pool, each count at most its ceiling (``launch.auto_max_servers``, ``launch.auto_max_threads``);
  a count the config sets is kept. At eta 0 generation and training take turns, so the trainer's
  threads span both pools and stop spinning after ``TURN_SPINCOUNT`` (unless the user set
  ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``);
* nothing assumes localhost: the host part of ``buffer.address`` is kept as configured.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from areal_like.settings.config import ConfigError, RunConfig
from areal_like.settings.distill_schema import DistillConfig
from launch.placement import (
    COUNTS,
    MEMORY_SHARE_FLAGS,
    memory_share,
    node_roles,
    place_nodes,
    reward_model_on_gpu,
    split_address,
    visible_devices,
)

# At eta 0 the trainer's idle OpenMP threads spin this many rounds (libgomp's default: 300,000), not
# ~1 ms on the rollout cores after each step: a step with 2 threads on the 8 x 8 workload is as fast
# with 10,000 as with the default (21 ms against 31 with one thread) and slow with 1,000 (31 ms)
# (benchmarks/README.md, "Layout choices")
TURN_SPINCOUNT = 10_000


@dataclass(frozen=True, kw_only=True)
class DaemonSlot:
    """One process the launcher starts: its name, kind, metrics port, pinned cores and GPUs."""

    name: str  # "buffer", "teacher-0", "rollout-0", ..., "trainer"
    kind: str  # "buffer" | "teacher" | "rollout" | "trainer"
    metrics_port: int  # a teacher's: its engine's port (/health open, the rest keyed)
    cpus: tuple[int, ...] | None  # None = not pinned
    overrides: tuple[str, ...] = ()  # extra `key=value` for this daemon's command line
    # its CUDA_VISIBLE_DEVICES; None = left as inherited (CPU topologies)
    gpus: tuple[int, ...] | None = None
    # OMP_NUM_THREADS; None: launch.omp_threads (pinned: see auto_threads)
    threads: int | None = None
    env: tuple[tuple[str, str], ...] = ()  # more environment (pinned at eta 0: the trainer's spin)
    node: int = 0  # launch.nodes > 1: the node it runs on (the buffer and trainer rank 0 on node 0)


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
        return next(s for s in self.slots if s.name == name)

    def ports(self) -> dict[str, int]:
        """Every port of the job by role (what ``ports.json`` records)."""
        router = int(self.buffer_address.rsplit(":", 1)[1])
        pub = int(self.pub_address.rsplit(":", 1)[1])
        out = {"buffer_router": router, "buffer_pub": pub, "trainer_master": self.master_port}
        out.update({f"{s.name}_metrics": s.metrics_port for s in self.slots})
        return out

    def to_json(self, hosts: list[str] | None = None) -> dict:
        """``ports.json``: the job's addresses and every daemon that serves ``/metrics`` (the
        trainer's other nodes report through rank 0), at its node's address (``hosts[node]``)."""
        daemons = []
        for s in self.slots:
            if s.metrics_port:
                url = f"http://{self.host if s.node == 0 else hosts[s.node]}:{s.metrics_port}"
                daemons.append({"name": s.name, "kind": s.kind, "metrics_port": s.metrics_port,
                                "cpus": s.cpus, "gpus": s.gpus, "metrics_url": f"{url}/metrics",
                                "health_url": f"{url}/health"})
        return {"host": self.host, "buffer_address": self.buffer_address,
                "pub_address": self.pub_address,
                "master_port": self.master_port, "rollout_cpus": self.rollout_cpus,
                "trainer_cpus": self.trainer_cpus, "daemons": daemons}


def split_cpus(cpus: Iterable[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Disjoint (rollout pool, trainer pool): the first half (at least one) and the rest (the
    larger half on odd counts: the trainer is the bottleneck of compute-bound CPU runs)."""
    cores = tuple(sorted(set(cpus)))
    if len(cores) < 2:
        raise ConfigError(f"launch.pin_cpus=true needs at least 2 cores, have {list(cores)}")
    k = len(cores) // 2
    return cores[:k], cores[k:]


def laptop_layout(cfg: RunConfig, cpus: Iterable[int], can_pin: bool = True) -> RunConfig:
    """The counts a CPU job on ONE machine leaves null (``COUNTS``), from the cores it may use
    (module docstring; measured in benchmarks/README.md: one trainer rank with several threads
    beats several FSDP ranks on CPU, and an embedded engine runs best single-threaded). One core,
    or no ``taskset`` (``can_pin=False``): one server, one rank, unpinned; one server attached by
    URL (``launch/placement.py``, ``check_one_node``). A GPU job's counts, and a multi-node job's
    (a ConfigError naming the null key), are its own."""
    la = cfg.launch
    unset = [key for key in COUNTS if getattr(la, key) is None]
    if not unset or cfg.trainer.device != "cpu" or cfg.rollout.engine.device != "cpu":
        return cfg  # a GPU job's counts are its own (place_nodes)
    if la.nodes > 1:
        raise ConfigError(f"launch.{unset[0]}=null (from the cores) is for a job on one machine; "
                          f"with launch.nodes={la.nodes} set it (launch/MULTINODE.md)")
    cores = tuple(sorted(set(cpus)))
    pin = la.pin_cpus if la.pin_cpus is not None else len(cores) >= 2 and can_pin  # set: kept
    url = cfg.rollout.engine.kind == "url"  # every server would attach to rollout.engine.url
    servers = min(len(split_cpus(cores)[0]), la.auto_max_servers) if pin and not url else 1
    launch = dataclasses.replace(la, num_rollout_servers=la.num_rollout_servers or servers,
                                 trainer_ranks=la.trainer_ranks or 1, pin_cpus=pin)
    return dataclasses.replace(cfg, launch=launch)


def layout_line(asked: RunConfig, laid: RunConfig, topo: Topology) -> str | None:
    """``areal-like plan``'s note when ``asked`` leaves a count null: what ``laid`` runs, why."""
    if all(getattr(asked.launch, key) is not None for key in COUNTS):
        return None
    la, cores, threads = laid.launch, topo.slot("trainer").cpus, topo.slot("trainer").threads
    servers = "one engine, rollout.engine.url" if laid.rollout.engine.kind == "url" else (
        "one core, or no taskset") if not la.pin_cpus else (
        f"one per core of the rollout pool {list(topo.rollout_cpus)}, at most "
        f"launch.auto_max_servers={la.auto_max_servers}")
    ranks = "one rank threads best on CPU" + (
        f", {threads} thread(s) per rank on cores {list(cores)}" if cores else "")
    why = dict(zip(COUNTS, (servers, ranks)))
    return "laid out from the cores: " + "; ".join(
        f"launch.{k}={getattr(la, k)} ({'as set' if getattr(asked.launch, k) else why[k]})"
        for k in COUNTS)


def _unique(ports: Iterable[int], taken: set[int]) -> Iterator[int]:
    for p in ports:
        if p not in taken:
            taken.add(p)
            yield p


def plan_topology(cfg: RunConfig, ports: Iterable[int],
                  cpus: Iterable[int] | None = None) -> Topology:
    """Every port left at 0 from ``ports`` (skipping duplicates and fixed ports), and the GPUs of
    ``place_nodes``. Rollout server i of a node gets ``rollout.metrics_port + i`` when that is
    fixed; the trainer's port is rank 0's. On several nodes: the buffer and trainer rank 0 on node
    0, one ``trainer-n<k>`` slot (its torchrun) per other training node, servers numbered across
    the rollout nodes."""
    host, router = split_address(cfg.buffer.address, "buffer.address")
    pub_host, pub = split_address(cfg.buffer.pub_address, "buffer.pub_address")
    fixed = _fixed_ports(cfg, router, pub)
    placed = place_nodes(cfg)  # before any port is taken: a refused layout costs nothing
    source = _unique(ports, fixed)

    def pick(p: int) -> int:
        return p if p else next(source)

    router, pub = pick(router), pick(pub)
    rollout_cpus = trainer_cpus = None
    if cfg.launch.pin_cpus:
        rollout_cpus, trainer_cpus = split_cpus(cpus if cpus is not None else ())
    # a GPU topology hides the GPUs from CPU-only daemons
    no_gpu = () if placed is not None else None
    job_cpus = rollout_cpus + trainer_cpus if cfg.launch.pin_cpus else None  # both pools
    turns = cfg.launch.pin_cpus and cfg.buffer.max_staleness == 0  # eta 0 (module docstring)
    slots = [DaemonSlot(name="buffer", kind="buffer", metrics_port=pick(cfg.buffer.metrics_port),
                        cpus=job_cpus, gpus=no_gpu)]
    for i, teacher in own_teachers(cfg).items():  # beside the servers they score for
        gpus = no_gpu if cfg.distill.device == "cpu" else None
        slots.append(DaemonSlot(name=f"teacher-{i}", kind="teacher", metrics_port=next(source),
                                cpus=rollout_cpus, gpus=gpus,
                                overrides=teacher_overrides(teacher, cfg.distill)))
    trainers = []
    for k in range(cfg.launch.nodes):
        gpus = placed[k] if placed is not None else None
        trains, serves = node_roles(cfg.launch.nodes, cfg.launch.train_nodes, k)
        for i in range(cfg.launch.num_rollout_servers if serves else 0):
            j = sum(1 for s in slots if s.kind == "rollout")  # server ids run across nodes
            slots.append(_rollout_slot(cfg, j, cfg.rollout.metrics_port + i
                                       if cfg.rollout.metrics_port else next(source), rollout_cpus,
                                       gpus.rollout[i] if gpus is not None and gpus.rollout
                                       else no_gpu, k))
        # trainer rank 0's node serves its metrics; the other nodes' ranks report through it
        if trains:
            cores = job_cpus if turns else trainer_cpus
            trainers.append(DaemonSlot(name="trainer" if k == 0 else f"trainer-n{k}",
                                       kind="trainer",
                                       metrics_port=pick(cfg.trainer.metrics_port) if k == 0 else 0,
                                       cpus=cores, gpus=gpus.trainer if gpus is not None else None,
                                       node=k, threads=auto_threads(cfg, cores),
                                       env=((("GOMP_SPINCOUNT", str(TURN_SPINCOUNT)),) if turns
                                            else ())))
    return Topology(host=host, buffer_address=f"tcp://{host}:{router}",
                    pub_address=f"tcp://{pub_host}:{pub}",
                    master_port=next(source), slots=(*slots, *trainers), rollout_cpus=rollout_cpus,
                    trainer_cpus=trainer_cpus)


def own_teachers(cfg: RunConfig) -> dict[int, str]:
    """The model directories of ``distill.teachers`` that the job serves with engine processes of
    its own (slot ``teacher-<i>`` for entry i; its URL replaces the directory in what the daemons
    read); a URL is used as is. ConfigError on several nodes or Ray, whose launchers start no
    teacher: there each is an engine URL."""
    own = {i: t for i, t in enumerate(cfg.distill.teachers) if not cfg.distill.is_url(t)}
    if own and (cfg.launch.nodes > 1 or cfg.launch.cluster != "local"):
        raise ConfigError(f"distill.teachers: {next(iter(own.values()))!r} (a model directory) is "
                          "served by a process of one-node local jobs only: with launch.nodes > 1 "
                          "or launch.cluster=ray give the URL of an engine serving it")
    return own


def teacher_overrides(teacher: str, distill: DistillConfig) -> tuple[str, ...]:
    """The teacher process's ``key=value`` on the job's config (``python -m
    rollout_server.engine``): its model on ``distill.teacher_engine`` (embedded: on
    ``distill.device``; SGLang and vLLM: with the job's flags for them), one engine, without the
    student's LoRA or weight path (never weight-synced)."""
    kind = distill.teacher_engine
    return (f"model.path={teacher}", f"rollout.engine.kind={kind}",
            f"rollout.engine.device={distill.device}", "rollout.engine.tp_size=1",
            "trainer.lora.rank=0",
            *(("rollout.pause_mode=abort", "trainer.weight_sync.path=auto") if kind == "vllm"
              else ()))


def auto_threads(cfg: RunConfig, cores: tuple[int, ...] | None) -> int | None:
    """A pinned trainer's threads per rank: its ranks share its cores, up to
    ``launch.auto_max_threads``; None (``launch.omp_threads``) when unpinned."""
    if not (cfg.launch.pin_cpus and cores):
        return None
    return max(1, min(len(cores) // cfg.launch.trainer_ranks, cfg.launch.auto_max_threads))


def _fixed_ports(cfg: RunConfig, router: int, pub: int) -> set[int]:
    """The ports the config fixes (non-zero) on node 0; ConfigError when two daemons share one."""
    # other nodes: other hosts
    n_roll = cfg.launch.num_rollout_servers if cfg.launch.nodes == 1 else 0
    own = [p for p in (router, pub, cfg.buffer.metrics_port, cfg.trainer.metrics_port) if p]
    if cfg.rollout.metrics_port:
        own += [cfg.rollout.metrics_port + i for i in range(n_roll)]
    if len(set(own)) != len(own):
        raise ConfigError("two daemons are configured with the same fixed port")
    return set(own)


def _rollout_slot(cfg: RunConfig, j: int, port: int, cpus: tuple[int, ...] | None,
                  gpus: tuple[int, ...] | None, node: int) -> DaemonSlot:
    # the first server evaluates
    evaluates = ("rollout.eval=true",) if j == 0 and wants_eval(cfg) else ()
    # its reward model's GPU: the last it sees, after its engine's (launch/placement.py)
    scorer = ((f"task.reward_model.device=cuda:{cfg.rollout.engine.tp_size}",)
              if gpus and reward_model_on_gpu(cfg) else ())
    return DaemonSlot(name=f"rollout-{j}", kind="rollout", metrics_port=port, cpus=cpus,
                      overrides=(f"rollout.server_id=rollout-{j}", f"rollout.metrics_port={port}",
                                 *evaluates, *scorer),
                      gpus=gpus, node=node)


def wants_eval(cfg: RunConfig) -> bool:
    """Whether the job evaluates at all: an eval is scheduled and the task has an eval split."""
    from areal_like.tasks.task import has_eval_split

    return (cfg.eval.every > 0 or cfg.eval.at_end) and has_eval_split(cfg.task)


def apply_topology(cfg: RunConfig, topo: Topology) -> RunConfig:
    """The config every daemon reads: addresses and metrics ports filled in; a trainer left to push
    at once (``trainer.first_engine_wait_s`` 0) waits for every rollout server (so that each joins
    the first group) as long as the launcher waits for their health, and less than half the gloo
    timeout (its other ranks wait in the push's collective meanwhile)."""
    buffer = dataclasses.replace(cfg.buffer, address=topo.buffer_address,
                                 pub_address=topo.pub_address,
                                 metrics_port=topo.slot("buffer").metrics_port)
    rollout = dataclasses.replace(cfg.rollout, buffer_address=topo.buffer_address,
                                  pub_address=topo.pub_address)
    wait, servers = cfg.trainer.first_engine_wait_s, sum(s.kind == "rollout" for s in topo.slots)
    if not wait and servers:
        wait = min(cfg.launch.health_timeout_s, cfg.trainer.gloo_timeout_s / 2)
    trainer = dataclasses.replace(cfg.trainer, buffer_address=topo.buffer_address,
                                  metrics_port=topo.slot("trainer").metrics_port,
                                  first_engine_wait_s=wait,
                                  first_engines=max(cfg.trainer.first_engines, servers))
    served = {s.name: s.metrics_port for s in topo.slots if s.kind == "teacher"}
    teachers = [f"http://{topo.host}:{served[f'teacher-{i}']}" if f"teacher-{i}" in served else t
                for i, t in enumerate(cfg.distill.teachers)]
    return dataclasses.replace(cfg, buffer=buffer, rollout=rollout, trainer=trainer,
                               distill=dataclasses.replace(cfg.distill, teachers=teachers))


def with_local_ipc(cfg: RunConfig) -> RunConfig:
    """A one-node job (``security.local_ipc``): every daemon reaches the buffer over ipc://
    sockets in ``<run_dir>/sock`` (or ``buffer.local_dir``), without CURVE (same user only:
    areal_like/net/security.py); unchanged when the paths would not fit AF_UNIX's limit."""
    from areal_like.net.security import IPC_PATH_MAX
    from areal_like.net.transport import local_addresses

    if cfg.launch.nodes != 1 or not cfg.security.local_ipc:
        return cfg
    # a configured one is kept
    local_dir = cfg.resolve_path(cfg.buffer.local_dir or "sock").resolve()
    router, pub = local_addresses(local_dir)
    if max(len(os.fsencode(a[len("ipc://"):])) for a in (router, pub)) > IPC_PATH_MAX:
        return cfg
    return dataclasses.replace(cfg,
                               buffer=dataclasses.replace(cfg.buffer, local_dir=str(local_dir)),
                               rollout=dataclasses.replace(cfg.rollout, buffer_address=router,
                                                           pub_address=pub),
                               trainer=dataclasses.replace(cfg.trainer, buffer_address=router))


def plan_lines(cfg: RunConfig, topo: Topology) -> list[str]:
    """``areal-like plan``: a header, then per process its node, name, GPUs (``-`` inherited,
    ``none`` hidden) and where it listens or connects; a port ``cfg`` leaves at 0 is ``auto``.
    ``cfg`` is laid out (``launch.job.laid_out``): its weight path is resolved."""
    fixed_metrics = {"buffer": cfg.buffer.metrics_port, "rollout": cfg.rollout.metrics_port,
                     "trainer": cfg.trainer.metrics_port, "teacher": 0}
    rows = [("node", "process", "gpus", "ports and addresses")]
    for s in sorted(topo.slots, key=lambda s: s.node):
        host = topo.host if s.node == 0 else f"node{s.node}"
        metrics = f"metrics {host}:{_port(fixed_metrics[s.kind], s.metrics_port)}"
        if s.kind == "buffer":
            where = (f"router {_addr(cfg.buffer.address)}  "
                     f"pub {_addr(cfg.buffer.pub_address)}  {metrics}")
        elif s.kind == "rollout":
            where = f"{metrics}  {_engine(cfg, host)}{_reward_model(cfg, s)}{_teachers(cfg)}"
        elif s.kind == "teacher":
            model = s.overrides[0].split("=", 1)[1]
            d = cfg.distill
            on = f" on {d.device}" if d.teacher_engine == "embedded" else ""
            where = (f"engine {d.teacher_engine}{on} http://{host}:auto  "
                     f"model {model} (never weight-synced)")
        else:
            where = _trainer_where(cfg, topo, s, metrics if s.node == 0 else "")
        rows.append((str(s.node), s.name, _gpus(s.gpus, cfg.launch.nodes == 1), where))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    return [f"{a:<{width[0]}}  {b:<{width[1]}}  {c:<{width[2]}}  {d}".rstrip()
            for a, b, c, d in rows]


def _gpus(gpus: tuple[int, ...] | None, one_node: bool) -> str:
    """The plan's GPU indices and, on one node (``areal-like run`` hands its processes the
    launcher's GPUs: ``launch/job.py``), the ones the launcher's ``CUDA_VISIBLE_DEVICES`` maps them
    to; on several nodes each process's is the plan's own (``launch/srun.py``)."""
    if gpus is None:
        return "-"
    if not gpus:
        return "none"
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES") if one_node else None
    planned = visible_devices(gpus)
    return planned if inherited is None else f"{planned} (={visible_devices(gpus, inherited)})"


def _trainer_where(cfg: RunConfig, topo: Topology, s: DaemonSlot, metrics: str) -> str:
    """One torchrun (on several nodes its ``--node-rank`` and global ranks), or, for one rank on
    one node, the trainer process itself."""
    la, ws = cfg.launch, cfg.trainer.weight_sync
    ranks = f"{la.trainer_ranks} rank{'s' if la.trainer_ranks != 1 else ''}" \
        + (" (LOCAL_RANK i: the i-th GPU)" if s.gpus else "")
    if la.nodes > 1:
        first = s.node * la.trainer_ranks
        ranks = (f"node-rank {s.node} of {la.train_nodes}, {ranks}, "
                 f"global {first}..{first + la.trainer_ranks - 1}")
    if not metrics:  # another training node: its ranks reach rank 0 through the rendezvous
        return f"torchrun {ranks} rendezvous {topo.host}:auto"
    backend = ws.backend_on(cfg.trainer.device)
    sync = (f"weight sync {backend} {ws.master_addr}:{_port(ws.master_port)}"
            if ws.path == "distributed" else f"weight sync {ws.path} (no group)")
    if la.nodes == 1 and la.trainer_ranks == 1:
        return f"{metrics}  python -m trainer (1 rank, no torchrun)  {sync}"
    return f"{metrics} (rank 0)  torchrun {ranks} rendezvous {topo.host}:auto  {sync}"


def _port(configured: int, planned: int | None = None) -> str:
    return "auto" if not configured else str(planned if planned is not None else configured)


def _addr(address: str) -> str:
    host, port = split_address(address)
    return f"tcp://{host}:{_port(port)}"


def engine_address(cfg: RunConfig, node_host: str) -> str:
    """Where the engine of a rollout server on ``node_host`` listens: ``rollout.engine.host``, or
    on several nodes, left at loopback, the node's address (trainer rank 0's guard reaches it)."""
    ec = cfg.rollout.engine
    spread = cfg.launch.nodes > 1 and ec.kind != "url" and ec.host == "127.0.0.1"
    return node_host if spread else ec.host


def _reward_model(cfg: RunConfig, s: DaemonSlot) -> str:
    """A rollout row's reward model, on the GPU its slot hands it or where the config says."""
    rm = cfg.task.reward_model
    if not rm.enabled:
        return ""
    if device := next((o.split("=", 1)[1] for o in s.overrides
                       if o.startswith("task.reward_model.device=")), None):
        return f"  reward model on GPU {s.gpus[-1]} ({device})"
    return f"  reward model on {'cpu' if rm.device == 'auto' else rm.device}"


def _teachers(cfg: RunConfig) -> str:
    """A rollout row's distillation teachers: each an engine at a URL, or the job's
    ``teacher-<i>`` process serving a model directory, and the tasks it scores."""
    d = cfg.distill
    return "".join((f"  teacher {t}" if d.is_url(t) else f"  teacher process teacher-{i}")
                   + (f" (tasks {','.join(d.teacher_tasks[i]) or 'the others'})"
                      if d.teacher_tasks else "")
                   for i, t in enumerate(d.teachers))


def _engine(cfg: RunConfig, node_host: str) -> str:
    ec = cfg.rollout.engine
    if ec.kind == "url":
        return f"engine {ec.url}"
    if ec.kind == "embedded":
        return f"engine embedded on {ec.device}"
    frac = memory_share(ec)
    mem = "" if frac is None else f" {MEMORY_SHARE_FLAGS[ec.kind][1]}={frac}"
    url = f"http://{engine_address(cfg, node_host)}:{_port(ec.port)}"
    return f"engine {ec.kind} tp={ec.tp_size}{mem} {url}"
