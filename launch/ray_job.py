"""``areal-like run launch.cluster=ray``: the job of ``areal-like run`` on a Ray cluster
(launch/RAY.md).

Ray places, watches and restarts; it carries no data (ZeroMQ with CURVE, the WAL, the keys and
the weight broadcast are the job's own). ``run_on_ray``:

1. connects to the cluster at ``launch.ray_address`` (else ``RAY_ADDRESS``, else the one started
   on this machine), never starting one, with Ray's token authentication (``RAY_AUTH_MODE=token``
   and the cluster's token: ``RAY_AUTH_TOKEN_PATH``, a file only its user reads, or
   ``RAY_AUTH_TOKEN``), and refuses a cluster that answers a client without the token;
2. reserves one placement-group bundle per node of the layout ``areal-like plan`` prints (the
   buffer and trainer rank 0 on node 0; CPUs ``launch.ray_cpus`` per process, the plan's GPUs),
   strategy SPREAD, and checks that every bundle's node sees the run directory;
3. hands ``launch/job.py``'s ``run_job`` a ``RayCluster``: the local supervisor then runs one
   small proxy per daemon (``python -m launch.ray_job exec``), which starts the daemon's command
   (``launch/srun.py``'s ``daemon_command``, as on Slurm) in a Ray actor on its bundle's node,
   relays its output (the supervisor's logs, its ``STARTED`` and refusal lines) and its exit code,
   and forwards SIGTERM. So restarts, stop order, logs, ``ports.json``, the Prometheus targets and
   ``status``/``top``/``stop`` are ``run``'s. A daemon whose node is lost ends its proxy (exit 1):
   the supervisor starts it again once Ray has placed the bundle anew.

No credential is a task or actor argument: the engine key and the CURVE keys are files under the
run directory only the job's user reads, and the forwarded environment holds no variable named
like a credential (``SECRET_NAME``); a daemon does not inherit Ray's token.

Bad input (Ray missing, no cluster, no token or one others may read, a cluster without token
authentication, a layout the cluster cannot hold, a run directory a node does not see) is a
``ConfigError``: one ``error:`` line, exit 2, before any daemon starts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from areal_like.daemon import popen_tied
from areal_like.net.auth import BIND_HOST_ENV, SECRET_NAME
from areal_like.net.distributed import free_port
from areal_like.net.security import SecurityError, owner_only
from areal_like.settings.config import ConfigError, RunConfig
from launch.job import job_specs, run_job, write_ports
from launch.local import STOP_GRACE_S, kill_survivors, write_json_atomic
from launch.placement import (
    COUNTS,
    each_node,
    engine_on_gpu,
    node_roles,
    reward_model_on_gpu,
    trainer_on_gpu,
)
from launch.scale import sized
from launch.srun import daemon_command
from launch.topology import DaemonSlot, Topology, split_address

NAMESPACE = "areal-like"
NODE_IP = "@NODE_IP@"  # in a daemon's command and environment: its node's address, set there
PLACE_TIMEOUT_S = 60.0  # a placement group the cluster cannot hold by then is refused
CONNECT_TIMEOUT_S = 5.0
HOSTS_EVERY_S = 2.0  # how often the driver rereads where the daemons run (ray/<name>.json)
# Ray's token authentication (Ray >= 2.52): the mode, and the token itself or the file holding it
AUTH_MODE_ENV, TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
AUTH_HELP = ("export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=<the cluster's token file, mode "
             "0600> (or RAY_AUTH_TOKEN), as on every node of the cluster (launch/RAY.md)")


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise ConfigError(f"launch.cluster=ray needs Ray, which is not installed ({e}): "
                          "pip install -e '.[ray]'") from None
    return ray


def connect(ray, address: str) -> str:
    """``ray.init`` on the cluster at ``address`` (never a new one); its GCS address."""
    if address.startswith("ray://"):
        raise ConfigError(f"launch.ray_address={address!r}: Ray Client is not supported (the job "
                          "starts processes that connect to the cluster themselves); run on a "
                          "node of the cluster or with `ray job submit`")
    if address.startswith(("http://", "https://")):
        raise ConfigError(f"launch.ray_address or RAY_ADDRESS is {address!r}, a dashboard "
                          "address (what `ray job submit` takes): give the cluster's GCS "
                          "address, HEAD:6379, or submit this command with `ray job submit`")
    if address != "auto":
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except (OSError, ValueError) as e:
            raise ConfigError(f"no Ray cluster at {address!r} (launch.ray_address or RAY_ADDRESS): "
                              f"{e}; start one with `ray start --head`") from None
    check_token()
    try:
        init(ray, address)
    except (ConnectionError, ValueError, RuntimeError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"no Ray cluster at {address!r} (launch.ray_address, RAY_ADDRESS, "
                          f"else one on this node), or it refused this process's Ray token: "
                          f"{why}") from None
    gcs = ray.get_runtime_context().gcs_address
    if not keyless_refused(gcs):
        ray.shutdown()
        raise ConfigError(f"the Ray cluster at {gcs} serves clients without a token: anyone who "
                          "reaches it runs code as its user, with this job's keys; start every "
                          "node of it with RAY_AUTH_MODE=token and the cluster's token "
                          "(launch/RAY.md)")
    return gcs


def check_token() -> None:
    """ConfigError unless this process uses Ray's token authentication with a token in its
    environment or in a non-empty file that only its user may read."""
    if os.environ.get(AUTH_MODE_ENV) != "token":
        raise ConfigError("launch.cluster=ray runs only with Ray's token authentication: "
                          + AUTH_HELP)
    if os.environ.get(TOKEN_ENV):
        return
    path = Path(os.environ.get(TOKEN_PATH_ENV) or Path.home() / ".ray" / "auth_token")
    try:
        owner_only(path)
        empty = not path.read_text().strip()
    except (OSError, SecurityError) as e:
        raise ConfigError(f"{TOKEN_PATH_ENV}: the Ray token file {path}: {e}") from None
    if empty:
        raise ConfigError(f"{TOKEN_PATH_ENV}: the Ray token file {path} is empty: {AUTH_HELP}")


def keyless_refused(gcs: str) -> bool:
    """Whether the cluster's GCS at ``gcs`` refuses a client that sends no token: its first call
    (``GetClusterId``, which every Ray client makes) sent without Ray's token header, over TLS
    with this process's certificates where Ray's TLS is on (``RAY_USE_TLS``), as Ray's own
    clients connect."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        from ray._common.tls_utils import load_certs_from_env

        chain, key, ca = load_certs_from_env()
        channel = grpc.secure_channel(gcs, grpc.ssl_channel_credentials(
            certificate_chain=chain, private_key=key, root_certificates=ca))
    else:
        channel = grpc.insecure_channel(gcs)
    with channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=CONNECT_TIMEOUT_S)
        except grpc.RpcError as e:
            return e.code() == grpc.StatusCode.UNAUTHENTICATED
    return False


def init(ray, address: str) -> None:
    """``ray.init`` keeping this process's SIGTERM and SIGINT handlers (Ray's core worker puts in
    its own, which end the process at once: no graceful stop)."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    ray.init(address=address, namespace=NAMESPACE, logging_level=logging.ERROR,
             log_to_driver=False)
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)


def request(cfg: RunConfig, kind: str, shared: bool = False) -> tuple[float, float]:
    """(CPUs, GPUs) one process of ``kind`` reserves; on one shared GPU the trainer and the
    engine take half of it each (Ray gives both the same GPU)."""
    la, cpus = cfg.launch, cfg.launch.ray_cpus
    if kind == "buffer":
        return cpus, 0
    if kind == "trainer":
        gpus = la.trainer_ranks if trainer_on_gpu(cfg) else 0
        return cpus * la.trainer_ranks, 0.5 if shared else gpus
    # its engine's GPUs and its reward model's (launch/placement.py, reward_model_on_gpu)
    gpus = cfg.rollout.engine.tp_size + reward_model_on_gpu(cfg) if engine_on_gpu(cfg) else 0
    return cpus, 0.5 if shared else gpus


def layout_bundles(cfg: RunConfig) -> tuple[list[dict[str, float]], bool]:
    """One bundle per node of the layout (``launch.*``, the plan's roles and GPUs), and whether
    its one GPU is shared; ConfigError for a layout that does not fit ``launch.gpus_per_node``."""
    la = cfg.launch
    for key in COUNTS:
        if getattr(la, key) is None:
            raise ConfigError(f"launch.{key}=null (from this machine's cores): a Ray job sets it")
    bundles, placed = [], each_node(cfg)
    for k, gpus in enumerate(placed):
        trains, serves = node_roles(la.nodes, la.train_nodes, k)
        kinds = (["buffer"] * (k == 0) + ["trainer"] * trains
                 + ["rollout"] * (la.num_rollout_servers if serves else 0))
        need = [request(cfg, kind, gpus.shared) for kind in kinds]
        bundle = {"CPU": sum(c for c, _ in need)}
        if gpus.used:
            bundle["GPU"] = float(gpus.used)
        bundles.append(bundle)
    return bundles, any(n.shared for n in placed)


def with_cluster_gpus(cfg: RunConfig, nodes: list[dict]) -> RunConfig:
    """``launch.gpus_per_node`` left 0 on a GPU job: the most GPUs a node of the cluster has."""
    if cfg.launch.gpus_per_node or not (trainer_on_gpu(cfg) or engine_on_gpu(cfg)):
        return cfg
    most = max((int(n["Resources"].get("GPU", 0)) for n in nodes), default=0)
    return dataclasses.replace(cfg, launch=dataclasses.replace(cfg.launch, gpus_per_node=most))


def check_fits(bundles: list[dict[str, float]], nodes: list[dict], address: str) -> None:
    """ConfigError unless each bundle fits a node of the cluster and all fit it together."""
    def show(res: dict[str, float]) -> str:
        return ", ".join(f"{res.get(k, 0):g} {k}" for k in ("CPU", "GPU"))

    have = [n["Resources"] for n in nodes]
    for k, bundle in enumerate(bundles):
        if not any(all(r.get(key, 0) >= v for key, v in bundle.items()) for r in have):
            biggest = max(have, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
            raise ConfigError(f"node {k} of the layout needs {show(bundle)} on one node and no "
                              f"node of the Ray cluster at {address} has that much (the largest: "
                              f"{show(biggest)}); see `areal-like plan` with the same launch.*")
    need = {key: sum(b.get(key, 0) for b in bundles) for key in ("CPU", "GPU")}
    total = {key: sum(r.get(key, 0) for r in have) for key in ("CPU", "GPU")}
    if any(need[key] > total[key] for key in need):
        raise ConfigError(f"the layout needs {show(need)} in all and the Ray cluster at {address} "
                          f"has {show(total)} (CPUs: launch.ray_cpus per process)")


def place(ray, bundles: list[dict[str, float]], name: str):
    """The placement group (ready) and each bundle's node address, bundle 0 first."""
    from ray.util import placement_group, placement_group_table, remove_placement_group

    pg = placement_group(bundles, strategy="SPREAD", name=name)
    try:
        ray.get(pg.ready(), timeout=PLACE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise ConfigError(f"the Ray cluster could not place the job's {len(bundles)} bundles "
                          f"{bundles} within {PLACE_TIMEOUT_S:g}s (other jobs hold its "
                          "resources?)") from None
    where = placement_group_table(pg)["bundles_to_node_id"]
    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    return pg, [ips[where[k]] for k in range(len(bundles))]


def _read_probe(path: str, nonce: str) -> str:
    """On a node: ``ok`` when ``path`` holds ``nonce``, else what it found."""
    try:
        found = Path(path).read_text()
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return "ok" if found == nonce else "another file of that name (not the same storage)"


def check_shared(ray, pg, hosts: list[str], run_dir: str) -> None:
    """ConfigError unless the node of every bundle reads a file written here beside ``run_dir``
    (in the nearest directory of it that exists)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    where = Path(run_dir).resolve()
    while not where.is_dir():
        where = where.parent
    nonce = secrets.token_hex(16)
    probe = where / f".areal-like-probe-{nonce[:8]}"
    try:
        probe.write_text(nonce)
    except OSError as e:
        raise ConfigError(f"run_dir {run_dir}: cannot write in {where}: {e}") from None
    task = ray.remote(num_cpus=0)(_read_probe)
    try:
        found = ray.get([task.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=k)).remote(str(probe), nonce)
            for k in range(len(hosts))], timeout=PLACE_TIMEOUT_S)
    finally:
        probe.unlink(missing_ok=True)
    for k, what in enumerate(found):
        if what != "ok":
            raise ConfigError(f"run_dir {run_dir} is not on storage every node sees: node "
                              f"{hosts[k]} (node {k} of the layout) reads {probe}: {what}; put "
                              "run_dir on a shared filesystem")


def on_hosts(cfg: RunConfig, head: str) -> RunConfig:
    """The buffer's and the weight group's addresses on node 0 (``head``) where the config leaves
    them on loopback; their ports as configured (0: ``run`` picks them)."""
    def moved(address: str) -> str:
        host, port = split_address(address)
        return f"tcp://{head}:{port}" if host in ("127.0.0.1", "localhost") else address

    ws = cfg.trainer.weight_sync
    master = head if ws.master_addr in ("127.0.0.1", "localhost") else ws.master_addr
    trainer = dataclasses.replace(cfg.trainer,
                                  weight_sync=dataclasses.replace(ws, master_addr=master))
    buffer = dataclasses.replace(cfg.buffer, address=moved(cfg.buffer.address),
                                 pub_address=moved(cfg.buffer.pub_address))
    return dataclasses.replace(cfg, buffer=buffer, trainer=trainer)


class RayCluster:
    """``run_job``'s launcher for Ray (``launch.job.Local``'s interface): one proxy per slot. A
    rollout server ``areal-like scale`` adds beyond the layout's runs outside the placement group
    (an actor of its own, spread over the cluster): its slot's node is a layout node of its own
    (``len(hosts) + i``), at the address Ray placed it on."""

    def __init__(self, pg_name: str, gcs: str, hosts: list[str], shared: bool):
        self.pg_name, self.gcs, self.shared = pg_name, gcs, shared
        self.placed = list(hosts)  # where each bundle is now (ray/<name>.json)
        self.bundles = len(hosts)  # layout nodes of the placement group
        self.base: dict[str, DaemonSlot] = {}  # the layout's slots, each in its bundle
        self.run_dir: Path | None = None
        self.topo: Topology | None = None
        self.pools: dict[str, int] | None = None
        self.written: list[str] | None = None
        self.read_at = 0.0

    def specs(self, cfg: RunConfig, topo: Topology, config_path: Path,
              trainer_args: list[str] | None = None) -> list:
        """One proxy ``ProcSpec`` per slot; ``trainer_args``: more ``key=value`` for the trainer
        (a resized job's, launch/scale.py)."""
        self.run_dir = Path(cfg.run_dir)
        (self.run_dir / "ray").mkdir(exist_ok=True)
        self.forget(topo)
        self.topo, self.base = topo, self.base or {s.name: s for s in topo.slots}
        self.pools = {"rollout": sum(s.kind == "rollout" for s in topo.slots),
                      "trainer": cfg.launch.trainer_ranks}
        self.placed += [self.placed[0]] * (max(s.node for s in topo.slots) + 1 - len(self.placed))
        out = []
        for spec, slot in zip(job_specs(cfg, topo, config_path), topo.slots, strict=True):
            env = {**spec.env, "RAY_ADDRESS": self.gcs,
                   BIND_HOST_ENV: os.environ.get(BIND_HOST_ENV) or NODE_IP}
            # no credential is an actor's argument (Ray keeps those): every daemon reads the
            # engine API key from the shared run_dir (0600), the others from its node's environment
            forward = [k for k in env if k not in ("CUDA_VISIBLE_DEVICES", "RAY_ADDRESS")
                       and not SECRET_NAME.search(k)]
            cpus, gpus = request(cfg, slot.kind, self.shared)
            bundle = slot.node if slot.node < self.bundles else -1
            extra = (trainer_args or []) if slot.kind == "trainer" else []
            proxy = [sys.executable, "-m", "launch.ray_job", "exec", "--pg", self.pg_name,
                     "--bundle", str(bundle), "--cpus", f"{cpus:g}", "--gpus", f"{gpus:g}",
                     "--name", slot.name, "--run-dir", str(self.run_dir),
                     "--forward", ",".join(forward),
                     *(["--hide-gpus"] if slot.gpus is not None else []), "--",
                     *daemon_command(cfg, topo, slot, str(config_path), NODE_IP), *extra]
            out.append(dataclasses.replace(spec, argv=proxy, env=env, cpus=None,
                                           health_url=self.health_url(slot)))
        return out

    def forget(self, topo: Topology) -> None:
        """Where a daemon that ``topo`` drops ran: forgotten (the same name may return later)."""
        names = {s.name for s in topo.slots}
        for slot in self.topo.slots if self.topo is not None else ():
            if slot.name not in names:
                (self.run_dir / "ray" / f"{slot.name}.json").unlink(missing_ok=True)

    def health_url(self, slot: DaemonSlot) -> str:
        return f"http://{self.placed[slot.node]}:{slot.metrics_port}/health"

    def scale_layout(self, cfg: RunConfig, topo: Topology, pool: str,
                     n: int) -> tuple[RunConfig, Topology]:
        """``launch/scale.py``'s plan of ``n`` of ``pool`` on Ray: the trainer on ``n`` ranks in
        its bundle (``ray_trainer_refusal`` checked that they fit); ``rollout-<i>`` for the new
        ``i`` in its bundle of the layout, else in an actor of its own (``own_slot``)."""
        if pool == "trainer":
            return sized(cfg, "trainer", n), topo
        servers = sorted((s for s in topo.slots if s.kind == "rollout"),
                         key=lambda s: int(s.name.rpartition("-")[2]))
        added = [self.base.get(f"rollout-{j}") or self.own_slot(cfg, j)
                 for j in range(len(servers), n)]
        slots = (*[s for s in topo.slots if s.kind == "buffer"], *servers[:n], *added,
                 *[s for s in topo.slots if s.kind == "trainer"])
        return cfg, dataclasses.replace(topo, slots=slots)

    def own_slot(self, cfg: RunConfig, j: int) -> DaemonSlot:
        """Server ``rollout-<j>`` beyond the layout: a layout server's slot (not the evaluating
        one's settings) with its own name and port (``rollout.metrics_port + j`` when fixed)."""
        like = next((s for s in self.base.values() if s.kind == "rollout"), None)
        if like is None:
            raise ConfigError("the job's layout has no rollout server to model another on")
        port = cfg.rollout.metrics_port + j if cfg.rollout.metrics_port else free_port()
        return dataclasses.replace(like, name=f"rollout-{j}", metrics_port=port,
                                   overrides=(f"rollout.server_id=rollout-{j}",
                                              f"rollout.metrics_port={port}"),
                                   node=self.bundles + j)

    def hosts(self) -> list[str]:
        """Each layout node's address now: a daemon placed anew (its node lost) moves it."""
        if self.run_dir is not None and time.monotonic() >= self.read_at:
            self.read_at = time.monotonic() + HOSTS_EVERY_S
            seen = []
            for slot in self.topo.slots:
                with contextlib.suppress(OSError, ValueError, KeyError):
                    path = self.run_dir / "ray" / f"{slot.name}.json"
                    seen.append((path.stat().st_mtime, slot.node,
                                 json.loads(path.read_text())["host"]))
            for _, node, host in sorted(seen):
                self.placed[node] = host
        return list(self.placed)

    def tick(self, sup) -> None:
        """ports.json, the Prometheus targets and the supervisor's health probes follow a daemon
        to the node it runs on now."""
        hosts = self.hosts()
        if hosts != self.written and self.topo is not None:
            self.written = hosts
            slots = {s.name: s for s in self.topo.slots}
            for p in sup.procs:
                if p.spec.name in slots and p.spec.health_url:
                    p.spec = dataclasses.replace(p.spec,
                                                 health_url=self.health_url(slots[p.spec.name]))
            write_ports(self.run_dir, self.topo, sup, self.pools, hosts=hosts)


def run_on_ray(cfg: RunConfig, quiet: bool = False, accept_changes: bool = False) -> int:
    """``areal-like run launch.cluster=ray``: the module docstring's steps 1-3."""
    ray = import_ray()
    # launch.ray_address, else RAY_ADDRESS, else a cluster on this node
    address = cfg.launch.ray_address or os.environ.get("RAY_ADDRESS") or "auto"
    gcs = connect(ray, address)
    pg = None
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        cfg = with_cluster_gpus(cfg, nodes)
        bundles, shared = layout_bundles(cfg)
        check_fits(bundles, nodes, address)
        name = f"areal-like-{os.getpid()}-{secrets.token_hex(4)}"
        pg, hosts = place(ray, bundles, name)
        check_shared(ray, pg, hosts, cfg.run_dir)
        print(f"[ray] {len(bundles)} bundles placed on {', '.join(hosts)} (cluster {gcs})",
              file=sys.stderr, flush=True)
        cfg = on_hosts(cfg, hosts[0])
        return run_job(cfg, quiet, accept_changes, cluster=RayCluster(name, gcs, hosts, shared))
    finally:
        if pg is not None:
            from ray.util import remove_placement_group

            with contextlib.suppress(Exception):
                remove_placement_group(pg)
        ray.shutdown()


# ---- on the nodes: the actor that runs one daemon, and its proxy beside the supervisor


class DaemonHost:
    """A Ray actor (threaded) that runs one daemon as a subprocess on its node and buffers its
    output for ``read``; the daemon dies with the actor (``popen_tied``)."""

    def __init__(self):
        self.lines: deque[str] = deque()
        self.cond = threading.Condition()
        self.popen: subprocess.Popen | None = None
        self.done = False

    def start(self, argv: list[str], env: dict[str, str], hide_gpus: bool, cwd: str) -> dict:
        import ray

        ip = ray.util.get_node_ip_address()
        argv = [a.replace(NODE_IP, ip) for a in argv]
        if argv[0] == "areal-like":  # this node's Python, whatever its PATH
            argv = [sys.executable, "-m", "launch.cli", *argv[1:]]
        argv = [sys.executable, "-m", "launch.ray_job", "guard", "--", *argv]
        env = {**os.environ, **{k: v.replace(NODE_IP, ip) for k, v in env.items()},
               "PYTHONUNBUFFERED": "1"}
        env.pop(TOKEN_ENV, None)  # Ray's token, which the node's workers hold: no daemon needs it
        if hide_gpus:  # the GPUs Ray gave this actor, none for a CPU process of a GPU job
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in ray.get_gpu_ids())
        self.popen = popen_tied(argv, env=env, cwd=cwd if os.path.isdir(cwd) else None,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=self._pump, daemon=True).start()
        return {"host": ip, "pid": self.popen.pid,
                "node_id": ray.get_runtime_context().get_node_id()}

    def _pump(self) -> None:
        for raw in iter(self.popen.stdout.readline, b""):
            with self.cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\r\n"))
                self.cond.notify_all()
        self.popen.wait()
        with self.cond:
            self.done = True
            self.cond.notify_all()

    def read(self, wait_s: float) -> tuple[list[str], int | None]:
        """The lines since the last read, and the exit code once the daemon exited and every line
        was read."""
        with self.cond:
            self.cond.wait_for(lambda: self.lines or self.done, wait_s)
            out = list(self.lines)
            self.lines.clear()
            return out, (self.popen.returncode if self.done else None)

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, sig)  # its guard passes it on


def guard(command: list[str], poll_s: float = 0.5) -> int:
    """``python -m launch.ray_job guard -- COMMAND``, the actor's child: COMMAND in a session of its
    own; SIGTERM and SIGINT passed on to its group (SIGKILL after ``STOP_GRACE_S``); its
    descendants recorded on every poll (torchrun's ranks have sessions of their own) and the
    survivors killed by PID once it exited. The kernel sends this SIGTERM when the actor dies
    (``popen_tied``), so a daemon never outlives its actor. Exit: COMMAND's (128 + signal)."""
    import psutil

    stop: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: stop.append(s))
    popen = popen_tied(command, start_new_session=True)
    seen: dict[int, psutil.Process] = {}
    deadline = None
    while popen.poll() is None:
        with contextlib.suppress(psutil.Error):
            seen.update((p.pid, p) for p in psutil.Process(popen.pid).children(recursive=True))
        if stop and deadline is None:
            deadline = time.monotonic() + STOP_GRACE_S
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, stop[0])
        if deadline is not None and time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(poll_s)
    kill_survivors(seen.values())
    return popen.returncode if popen.returncode >= 0 else 128 - popen.returncode


def _wait(ray, ref, stop: list[int]):
    """``ray.get(ref)``, or None once a stop signal came first."""
    while not ray.wait([ref], timeout=0.5)[0]:
        if stop:
            return None
    return ray.get(ref)


def proxy(args: argparse.Namespace) -> int:
    """``python -m launch.ray_job exec ... -- COMMAND``: COMMAND in a ``DaemonHost`` on bundle
    ``--bundle`` of the job's placement group; its output on stdout, its exit code as this one's;
    SIGTERM and SIGINT forwarded. A lost node (or actor) exits 1."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    stop: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: stop.append(s))
    # Ray prints the cluster's error messages (a node lost, its raylet's state dump) on every
    # driver's sys.stdout: the job's own driver shows them, a daemon's output holds only its own
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = open(os.devnull, "w")  # for this process's whole life
    init(ray, os.environ["RAY_ADDRESS"])
    # bundle -1: a server beyond the layout's, spread over the cluster outside the placement group
    where = "SPREAD" if args.bundle < 0 else PlacementGroupSchedulingStrategy(
        ray.util.get_placement_group(args.pg), placement_group_bundle_index=args.bundle)
    actor = ray.remote(DaemonHost).options(num_cpus=args.cpus, num_gpus=args.gpus,
                                           max_concurrency=4, scheduling_strategy=where).remote()
    env = {k: os.environ[k] for k in args.forward.split(",") if k in os.environ}
    try:
        info = _wait(ray, actor.start.remote(args.command, env, args.hide_gpus, os.getcwd()), stop)
        if info is None:
            return 128 + stop[0]
        print(f"[ray] {args.name}: pid {info['pid']} on node {info['host']} "
              f"({info['node_id'][:12]})", file=out, flush=True)
        write_json_atomic(Path(args.run_dir) / "ray" / f"{args.name}.json", info)
        return _relay(ray, actor, stop, out)
    except ray.exceptions.RayError as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"[ray] {args.name}: its actor or node is lost ({type(e).__name__}: {why})",
              file=out, flush=True)
        return 1


def _relay(ray, actor, stop: list[int], out) -> int:
    forwarded = False
    while True:
        if stop and not forwarded:
            actor.signal.remote(stop[0])
            forwarded = True
        lines, rc = ray.get(actor.read.remote(0.5))
        for line in lines:
            print(line, file=out, flush=True)
        if rc is not None:
            return rc if rc >= 0 else 128 - rc


def main(argv: list[str]) -> int:
    if argv[:2] == ["guard", "--"] and len(argv) > 2:
        return guard(argv[2:])
    ap = argparse.ArgumentParser(prog="python -m launch.ray_job",
                                 description="one daemon of a Ray job (launch/RAY.md)")
    sub = ap.add_subparsers(dest="sub", required=True)
    ex = sub.add_parser("exec", help="run COMMAND on a bundle of the job's placement group")
    ex.add_argument("--pg", required=True)
    ex.add_argument("--bundle", type=int, required=True,
                    help="the bundle of --pg; -1: none (an actor of its own, spread)")
    ex.add_argument("--cpus", type=float, required=True)
    ex.add_argument("--gpus", type=float, required=True)
    ex.add_argument("--name", required=True)
    ex.add_argument("--run-dir", required=True)
    ex.add_argument("--forward", default="", help="comma-separated environment to pass on")
    ex.add_argument("--hide-gpus", action="store_true",
                    help="CUDA_VISIBLE_DEVICES: the GPUs Ray assigned (none: empty)")
    ex.add_argument("command", nargs="+")
    return proxy(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
