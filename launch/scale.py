"""``areal-like scale RUN_DIR rollout=N`` / ``trainer=N``: a pool resized while the job runs.

The command checks the request and writes it to ``RUN_DIR/scale.json`` (atomically: ``{"id",
"pool", "size"}``), the desired size; the job's supervisor (``areal-like run``) applies it in its
loop (``Scaler``, its ``on_tick``) and records what it did in ``RUN_DIR/scaled.json`` (``{"id",
"state": applying | done | refused, "message", "sizes"}``), which the command waits for. A file in
the run directory, not a socket: it needs nothing but the storage every node of a job already
shares (a Ray launcher applies the same file), survives the command (Ctrl-C while it waits changes
nothing) and says what the job was last asked for.

* ``rollout=N``: servers ``rollout-<i>`` for the new ``i`` are planned by the same layout code as at
  start (``launch/topology.py``: ports, pinned cores, GPUs) and started with the same command; the
  highest-numbered leave first (``rollout-0``, which evaluates, never): SIGTERM, on which a server
  cancels its episodes, sends what is unacknowledged, and leaves the buffer's roster, which
  re-issues its leases at once (rollout_server/ROLLOUT.md). Groups the buffer acknowledged are in
  its WAL and stay there.
* ``trainer=N``: SIGTERM to the trainer, on which it saves a checkpoint (trainer/loop.py), then the
  trainer again on N ranks (torchrun, or one process for 1), which resumes from that checkpoint
  (DCP reshards it; ranks beyond the saved ones take a fresh RNG: trainer/checkpoint.py).
* refused in one line, exit 2: a job not running (or not started by ``areal-like run``), an
  unknown pool, a size that is not a whole number, fewer than 1, fewer rollout servers than one
  batch needs at once (``N x rollout.max_concurrent_groups < buffer.groups_per_step``), more than
  the buffer admits (``buffer/facts.py``, ``max_servers``), a layout that does not fit (GPUs) or
  would move a running server's GPUs; on Ray, a trainer larger than the one it started with.

A job on Ray (``launch.cluster=ray``) is resized by the same ``Scaler`` with the launcher's
``specs``, ``publish`` and ``layout`` (``launch/ray_job.py``, ``RayCluster``): a server beyond the
layout's runs in a Ray actor of its own, outside the job's placement group; its trainer scales
within the bundle reserved at the start (launch/RAY.md). Another launcher passes its own the same
way; the object it passes as ``sup`` has ``Supervisor``'s ``add``, ``remove``, ``restart_as``,
``procs`` and ``echo``.

A scale lasts for this run of the job: config.yaml keeps the sizes it started with, and a resume
(the same ``areal-like run`` again) starts those unless given ``launch.num_rollout_servers`` /
``launch.trainer_ranks``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from areal_like.net.distributed import free_port
from areal_like.settings.config import ConfigError, RunConfig
from launch.local import ProcSpec, Supervisor, probe, read_json, write_json_atomic
from launch.placement import check_one_node
from launch.records import read_jsonl, trainer_jsonl
from launch.rundir import latest_checkpoint_step
from launch.topology import Topology, plan_topology

REQUEST_FILE = "scale.json"  # in run_dir: the size the operator asked for (the command writes it)
STATE_FILE = "scaled.json"  # in run_dir: what the supervisor did with it
POOLS = ("rollout", "trainer")
# a trainer told to stop saves a checkpoint first: a large model's takes longer than a daemon's
# graceful stop (launch/local.py STOP_GRACE_S)
CHECKPOINT_GRACE_S = 300.0
WAIT_POLL_S = 0.2


class ScaleRefused(ValueError):
    """A request that cannot be applied: one ``error:`` line, exit 2."""


def parse(args: list[str]) -> tuple[str, int]:
    """``["rollout=2"]`` -> ``("rollout", 2)``; ScaleRefused naming what is wrong."""
    if len(args) != 1 or "=" not in args[0]:
        raise ScaleRefused(f"give one pool size, rollout=N or trainer=N (got {' '.join(args)!r})")
    pool, _, size = args[0].partition("=")  # an unknown pool: ``refusal`` names it
    try:
        n = int(size.strip())
    except ValueError:
        raise ScaleRefused(f"{pool}={size!r} is not a whole number") from None
    return pool, n


def refusal(cfg: RunConfig, pool: str, n: int) -> str | None:
    """Why the job ``cfg`` (its config.yaml) cannot run ``n`` of ``pool``; None when it can. The
    layout itself (GPUs) is checked when the supervisor plans it (``Scaler``)."""
    from buffer.facts import max_servers

    if pool not in POOLS:
        return f"unknown pool {pool!r}: the pools are {' and '.join(POOLS)}"
    if not isinstance(n, int) or isinstance(n, bool):
        return f"{pool}={n!r} is not a whole number"
    if n < 1:
        return (f"{pool}={n}: a running job needs at least one "
                + ("rollout server" if pool == "rollout" else "trainer rank")
                + " (`areal-like stop` stops the job)")
    if pool == "trainer":
        return ray_trainer_refusal(cfg, n) if cfg.launch.cluster == "ray" else None
    per, batch = cfg.rollout.max_concurrent_groups, cfg.buffer.groups_per_step
    if n * per < batch:
        return (f"rollout={n}: {n} x rollout.max_concurrent_groups={per} groups at once is fewer "
                f"than one batch needs (buffer.groups_per_step={batch}); at least "
                f"{math.ceil(batch / per)} rollout servers")
    if n > (cap := max_servers(cfg)):
        return (f"rollout={n}: the job's buffer admits at most {cap} rollout servers (2 x "
                f"launch.num_rollout_servers={cfg.launch.num_rollout_servers} at its start, at "
                "least 8): run the job again with a larger launch.num_rollout_servers")
    if cfg.launch.cluster == "ray":  # a server beyond the layout's gets its own actor
        return None
    try:
        check_one_node(sized(cfg, "rollout", n))
    except ConfigError as e:
        return str(e)
    return None


def ray_trainer_refusal(cfg: RunConfig, n: int) -> str | None:
    """Why a Ray job (``cfg``: as it started) cannot run its trainer on ``n`` ranks: its placement
    group's bundle on each training node holds the CPUs and GPUs of the ranks it started with."""
    la = cfg.launch
    if la.train_nodes > 1:
        return (f"trainer={n}: a Ray job's trainer on launch.train_nodes={la.train_nodes} nodes "
                "is not resized (one torchrun per node, each in its own bundle)")
    if n > la.trainer_ranks:
        return (f"trainer={n}: a Ray job's trainer runs in the bundle its placement group "
                f"reserved at the start, for launch.trainer_ranks={la.trainer_ranks} ranks; "
                f"start the job with launch.trainer_ranks={n} to grow it to {n} (launch/RAY.md)")
    return None


def sized(cfg: RunConfig, pool: str, n: int) -> RunConfig:
    key = "num_rollout_servers" if pool == "rollout" else "trainer_ranks"
    return dataclasses.replace(cfg, launch=dataclasses.replace(cfg.launch, **{key: n}))


# ------------------------------------------------------------------ the command
def request(run_dir: str | Path, args: list[str], timeout_s: float, out=sys.stdout) -> int:
    """``areal-like scale``: 0 once the supervisor applied it, 2 when refused (one ``error:``
    line), 1 when not applied within ``timeout_s`` (it may still be)."""
    run_dir = Path(run_dir)
    try:
        pool, n = parse(args)
        if why := refusal(run_config(run_dir), pool, n):
            raise ScaleRefused(why)
        check_running(run_dir)
    except ScaleRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ask = {"id": uuid.uuid4().hex, "pool": pool, "size": n}
    write_json_atomic(run_dir / REQUEST_FILE, ask)
    print(f"asked the job in {run_dir} for {pool}={n}", file=out, flush=True)
    try:
        return wait_done(run_dir, ask, timeout_s, out)
    except KeyboardInterrupt:  # the request stays: the job applies it all the same
        print(f"interrupted; the job applies {pool}={n} all the same ({run_dir / STATE_FILE} "
              "says when)", file=sys.stderr)
        return 130


def wait_done(run_dir: Path, ask: dict, timeout_s: float, out) -> int:
    """``request``'s exit code once the supervisor recorded ``ask`` done or refused, another
    request replaced it in scale.json (the supervisor applies only the last), the job ended or
    ``timeout_s`` passed."""
    from launch.top import job_running

    what, deadline = f"{ask['pool']}={ask['size']}", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (code := answered(run_dir, ask, out)) is not None:
            return code
        if (later := read_json(run_dir / REQUEST_FILE)).get("id") != ask["id"]:
            if (code := answered(run_dir, ask, out)) is not None:  # done just before
                return code
            by = (f"another request ({later.get('pool')}={later.get('size')})" if later
                  else f"removing {run_dir / REQUEST_FILE}")
            print(f"error: {by} replaced {what} before the job reported it done (one request "
                  f"at a time: the job applies the last; {run_dir / STATE_FILE} says what it did)",
                  file=sys.stderr)
            return 1
        if not job_running(run_dir):
            print(f"error: the job in {run_dir} ended before it applied {what}", file=sys.stderr)
            return 1
        time.sleep(WAIT_POLL_S)
    print(f"error: {what} not applied within {timeout_s:g}s (see {run_dir / STATE_FILE} and "
          f"{run_dir / 'logs'}; it may still be)", file=sys.stderr)
    return 1


def answered(run_dir: Path, ask: dict, out) -> int | None:
    """0 (its message printed) once scaled.json records ``ask`` done, 2 (its ``error:`` line)
    once refused; None before."""
    done = read_json(run_dir / STATE_FILE)
    if done.get("id") != ask["id"] or done.get("state") not in ("done", "refused"):
        return None
    if done["state"] == "refused":
        print(f"error: {done.get('message')}", file=sys.stderr)
        return 2
    print(done.get("message", "done"), file=out, flush=True)
    return 0


def run_config(run_dir: Path) -> RunConfig:
    """The config.yaml of ``run_dir`` (laid out: the counts the job started with)."""
    from areal_like.settings.config import load_daemon_config

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ScaleRefused(f"{run_dir} is not a run directory (no config.yaml)")
    try:
        return load_daemon_config(["--config-file", str(path)])
    except ConfigError as e:
        raise ScaleRefused(f"{path}: {e}") from None


def check_running(run_dir: Path) -> None:
    """ScaleRefused unless ``areal-like run`` runs the job of ``run_dir`` (its supervisor applies
    the request)."""
    from launch.top import job_running, launcher, preparing

    if not job_running(run_dir):
        raise ScaleRefused(f"no job is running in {run_dir}: nothing to scale")
    if preparing(run_dir) is not None:
        raise ScaleRefused(f"the job in {run_dir} is still starting (no daemon yet): scale it "
                           "once `areal-like status` lists its daemons")
    pid = launcher(run_dir)
    if pid is None or read_json(run_dir / "ports.json").get("supervisor_pid") != pid:
        raise ScaleRefused(f"the job in {run_dir} was not started by `areal-like run` (or it is "
                           "stopping): no supervisor there applies a scale")


# ------------------------------------------------------------------ the supervisor's side
class Scaler:
    """``areal-like run``'s ``on_tick`` part that applies ``scale.json`` (module docstring).
    ``specs(cfg, topo, trainer_args)``: the job's ``ProcSpec`` per slot (``launch.job.job_specs``);
    ``publish(topo, sizes, sup)``: ports.json and the Prometheus targets of the new pools. A
    request there before the job started (an earlier run's) is not applied."""

    def __init__(self, cfg: RunConfig, topo: Topology, run_dir: Path,
                 specs: Callable[[RunConfig, Topology, list[str]], list[ProcSpec]],
                 publish: Callable[[Topology, dict, Supervisor], None],
                 layout: Callable[[RunConfig, Topology, str, int],
                                  tuple[RunConfig, Topology]] | None = None):
        self.cfg, self.topo, self.run_dir = cfg, topo, Path(run_dir)
        self.specs, self.publish, self.layout = specs, publish, layout
        self.sizes = {"rollout": sum(s.kind == "rollout" for s in topo.slots),
                      "trainer": cfg.launch.trainer_ranks}
        self.seen = read_json(self.run_dir / REQUEST_FILE).get("id")
        self.pending: tuple[dict, list[str], str] | None = None  # (request, names, message)

    def __call__(self, sup: Supervisor) -> None:
        if self.pending is not None:
            self.check_pending(sup)
        ask = read_json(self.run_dir / REQUEST_FILE)
        if not ask or ask.get("id") == self.seen:
            return
        self.seen = ask.get("id")
        pool, n = ask.get("pool"), ask.get("size")
        why = refusal(self.cfg, pool, n)
        if why is None and n == self.sizes[pool]:
            self.record(ask, "done", f"{pool} already has {n}")
            return
        try:
            if why is not None:
                raise ConfigError(why)
            cfg, topo = self.plan(pool, n)
        except ConfigError as e:
            sup.echo(f"[supervisor] scale {pool}={n} refused: {e}")
            self.record(ask, "refused", str(e))
            return
        self.record(ask, "applying", f"{pool}: {self.sizes[pool]} -> {n}")
        self.apply(sup, ask, cfg, topo)

    def plan(self, pool: str, n: int) -> tuple[RunConfig, Topology]:
        """The job's layout with ``n`` of ``pool``, as ``plan_topology`` lays it out at start; every
        running daemon keeps its slot (ports, cores). ConfigError when it does not fit, or would
        move a running rollout server's GPUs. A launcher's own ``layout(cfg, topo, pool, n)``
        plans it instead where given (Ray: launch/ray_job.py)."""
        if self.layout is not None:
            return self.layout(sized(self.cfg, "trainer", self.sizes["trainer"]), self.topo,
                               pool, n)
        cfg = sized(sized(self.cfg, "rollout", self.sizes["rollout"]), pool, n)
        cores = (None if self.topo.rollout_cpus is None
                 else self.topo.rollout_cpus + self.topo.trainer_cpus)
        planned = plan_topology(cfg, iter(free_port, 0), cores)
        old = {s.name: s for s in self.topo.slots}
        for s in planned.slots:
            if s.kind == "rollout" and s.name in old and s.gpus != old[s.name].gpus:
                raise ConfigError(f"{pool}={n} would move {s.name} from GPUs {old[s.name].gpus} "
                                  f"to {s.gpus} (trainer ranks take the first GPUs): scale the "
                                  "rollout pool down first")
        slots = tuple(old[s.name] if s.name in old and s.kind != "trainer"
                      else dataclasses.replace(s, metrics_port=old[s.name].metrics_port)
                      if s.name in old else s for s in planned.slots)
        # the teacher process (its directory is a URL in the daemons' config): kept as it runs
        kept = tuple(s for s in self.topo.slots if s.kind == "teacher")
        slots = (*slots[:1], *kept, *slots[1:]) if kept else slots
        return cfg, dataclasses.replace(self.topo, slots=slots)

    def apply(self, sup: Supervisor, ask: dict, cfg: RunConfig, topo: Topology) -> None:
        """Stop, start or restart the daemons ``topo`` adds, drops or changes; every process's
        next restart follows the new layout."""
        before, pool, n = self.topo, ask["pool"], ask["size"]
        message = f"{pool}: {self.sizes[pool]} -> {n}"
        specs = {s.name: s for s in self.specs(cfg, topo, [
            f"trainer.first_engines={sum(s.kind == 'rollout' for s in topo.slots)}"])}
        names = {s.name for s in topo.slots}
        on_change, sup.on_change = sup.on_change, None  # ports.json once, with the new pools
        try:
            self.topo, self.sizes = topo, {**self.sizes, pool: n}
            for s in reversed(before.slots):
                if s.name not in names:
                    sup.echo(f"[supervisor] scale {pool}={n}: {s.name} leaves")
                    sup.remove(s.name)
            started = [s.name for s in topo.slots if s.name not in {o.name for o in before.slots}]
            for name in started:
                sup.add(specs[name])
            if pool == "trainer":
                message = self.restart_trainer(sup, specs["trainer"], n)
                started = ["trainer"]
            for p in sup.procs:  # later restarts use the new layout (the trainer's first_engines)
                p.spec = specs.get(p.spec.name, p.spec)
        finally:
            sup.on_change = on_change
        self.publish(self.topo, self.sizes, sup)
        self.pending = (ask, started, message)
        self.check_pending(sup)

    def restart_trainer(self, sup: Supervisor, spec: ProcSpec, n: int) -> str:
        """SIGTERM to the trainer (it saves a checkpoint), then the trainer on ``n`` ranks; what
        was done, for scaled.json."""
        root = self.cfg.resolve_path(self.cfg.trainer.checkpoint_dir)
        sup.echo(f"[supervisor] scale trainer={n}: stopping the trainer (it saves a checkpoint)")
        sup.restart_as("trainer", spec, grace_s=max(CHECKPOINT_GRACE_S, sup.stop_grace_s))
        step = latest_checkpoint_step(root)
        trained = max((r["step"] for r in read_jsonl(trainer_jsonl(self.run_dir))
                       if isinstance(r.get("step"), int)), default=0)
        where = "from the start (no checkpoint yet)" if step is None else (
            f"from checkpoint v{step:08d}")
        lost = (f"; {trained - (step or 0)} steps after it were lost (no checkpoint at the stop)"
                if trained > (step or 0) else "")
        return f"trainer: restarted on {n} rank{'s' * (n != 1)} {where}{lost}"

    def check_pending(self, sup: Supervisor) -> None:
        """``done`` once every daemon the last request started has started (logged ``STARTED``:
        the trainer after it loaded the checkpoint) and answers its /health."""
        ask, names, message = self.pending
        procs = {p.spec.name: p for p in sup.procs}
        if all(name in procs and procs[name].started
               and probe(procs[name].spec.health_url) for name in names):
            self.pending = None
            sup.echo(f"[supervisor] scale {ask['pool']}={ask['size']} done: {message}")
            self.record(ask, "done", message)

    def record(self, ask: dict, state: str, message: str) -> None:
        with contextlib.suppress(OSError):  # a full disk: the command times out and says so
            write_json_atomic(self.run_dir / STATE_FILE,
                              {"id": ask.get("id"), "pool": ask.get("pool"),
                               "size": ask.get("size"), "state": state, "message": message,
                               "sizes": self.sizes, "time": round(time.time(), 3)})
