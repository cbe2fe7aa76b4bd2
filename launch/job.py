"""``areal-like run`` (``run_job``): preflight, the run directory's lock and state, warm start,
plan, supervisor, summary. ``plan_job`` is the ONE place the layout-dependent config is made, and
``config.yaml`` the only config every daemon reads; a ``ConfigError`` is the CLI's exit 2, before
anything started; the summary goes to stdout as ONE JSON line (``steps``: the steps THIS
invocation trained).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from areal_like.daemon import MALLOC_ENV
from areal_like.net.auth import BIND_HOST_ENV, ENGINE_KEY_ENV, engine_api_key, ensure_key_file
from areal_like.net.distributed import free_port
from areal_like.net.security import make_keys
from areal_like.settings.config import ConfigError, RunConfig, absolute_files, to_yaml
from launch.local import (
    REFUSED_EXIT,
    ProcSpec,
    Supervisor,
    error_tail,
    refusal,
    rotating_file,
    write_json_atomic,
    write_line,
)
from launch.placement import (
    check_one_node,
    idle_gpus,
    needs_gpus,
    place_nodes,
    visible_devices,
    with_weight_path,
)
from launch.preflight import checked
from launch.records import (
    SUMMARY_WINDOW,
    has_final_eval,
    last_per,
    reward_of,
    step_of,
    summarize,
    trainer_jsonl,
    warm_plotting,
)
from launch.rundir import (
    CHECKPOINT_PREFIX,
    JOB_FILE,
    SETTINGS_FILE,
    check_existing_run,
    check_resume_settings,
    file_state,
    latest_checkpoint_step,
    lock_run_dir,
    restore_file,
    write_job,
    write_settings,
)
from launch.scale import Scaler
from launch.topology import (
    Topology,
    apply_topology,
    laptop_layout,
    plan_topology,
    wants_eval,
    with_local_ipc,
)
from launch.track_sink import JsonlTail, TrackerSink

PROGRESS_EVERY_S = 5.0  # a live line this often keeps a terminal alive without flooding logs
SCRAPE_EVERY_S = 10.0  # /metrics snapshots in scrape.jsonl; Prometheus does the fine-grained job
TRACK_EVERY_S = 2.0  # tracker sink polls: reads only what the files gained, so cheap


def with_gpu_count(cfg: RunConfig) -> RunConfig:
    """``launch.gpus_per_node`` from ``torch.cuda.device_count()`` when the config leaves it 0 and a
    process of the job runs on a GPU; otherwise ``cfg`` as it is (CPU jobs never import torch
    here)."""
    if cfg.launch.gpus_per_node or not needs_gpus(cfg):
        return cfg
    import torch

    return dataclasses.replace(
        cfg, launch=dataclasses.replace(cfg.launch, gpus_per_node=torch.cuda.device_count()))


def laid_out(cfg: RunConfig, cpus: list[int] | None = None) -> tuple[RunConfig, list[int] | None]:
    """``cfg`` laid out for this machine (``laptop_layout``, GPU count, weight path), and the cores
    used (when pinning or laying out)."""
    la = cfg.launch
    if cpus is None and (la.pin_cpus or la.num_rollout_servers is None or la.trainer_ranks is None):
        cpus = sorted(os.sched_getaffinity(0))  # the cores this process may run on
    cfg = laptop_layout(cfg, cpus or (), can_pin=shutil.which("taskset") is not None)
    return with_weight_path(with_gpu_count(cfg)), cpus


def plan_job(cfg: RunConfig, cpus: list[int] | None = None,
             ports=None) -> tuple[RunConfig, Topology]:
    """(the config the daemons read, the topology), nothing written or started; ConfigError for a
    layout that does not fit. The ONE place the layout-dependent config is made: ``run``, ``plan``,
    ``config`` and ``launch/srun.py`` all call it, and laying out a laid-out config changes
    nothing. ``ports``: where the ports left at 0 come from (default: free ports here)."""
    cfg = dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir).resolve()),
                              task=absolute_files(cfg.task))
    cfg, cpus = laid_out(cfg, cpus)
    topo = plan_topology(cfg, iter(free_port, 0) if ports is None else ports, cpus)
    return with_local_ipc(apply_topology(cfg, topo)), topo  # one node: same-node sockets, no CURVE


def prepare(cfg: RunConfig, cpus: list[int] | None = None) -> tuple[RunConfig, Topology, Path]:
    """Plan the job, write config.yaml; returns (config the daemons read, topology, its path)."""
    cfg, topo = plan_job(cfg, cpus)
    run_dir = Path(cfg.run_dir)
    (run_dir / "metrics").mkdir(parents=True, exist_ok=True)
    # kept when the run resumes; one readable by others is refused (SecurityError) before
    # config.yaml is written
    if cfg.security.curve:  # the job's CURVE keys, no user step
        make_keys(cfg.resolve_path(cfg.security.keys_dir))
    if engine_api_key(run_dir) is None:  # the job's engine API key, which job_specs hands out
        ensure_key_file(run_dir)
    path = run_dir / "config.yaml"
    # no credential in it: they travel in the environment (areal_like/net/auth.py)
    path.write_text(to_yaml(cfg))
    return cfg, topo, path


def job_specs(cfg: RunConfig, topo: Topology, config_path: Path,
              python: str = sys.executable,
              trainer_args: tuple[str, ...] | list[str] = ()) -> list[ProcSpec]:
    """One ``ProcSpec`` per slot of ``topo``, started in ``start_stage`` order, with its GPUs;
    ``trainer_args``: more ``key=value`` for the trainer (a resized job's: launch/scale.py)."""
    env = {**{k: v for k, v in MALLOC_ENV.items() if k not in os.environ},
           "OMP_NUM_THREADS": str(cfg.launch.omp_threads),
           "MKL_NUM_THREADS": str(cfg.launch.omp_threads),
           "AREAL_LIKE_RUN_DIR": cfg.run_dir,
           # /metrics binds where the supervisor probes it: the job's host
           # (loopback unless configured)
           BIND_HOST_ENV: os.environ.get(BIND_HOST_ENV) or topo.host}
    key = engine_api_key(cfg.run_dir)  # one exported by the user, else the run's own (prepare)
    if key:
        env[ENGINE_KEY_ENV] = key
    base = ["--config-file", str(config_path)]
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")  # plan index i is the launcher's i-th GPU
    shared = shares_gpu(cfg)
    specs = []
    for slot in topo.slots:
        health = f"http://{topo.host}:{slot.metrics_port}/health"
        if slot.kind == "buffer":
            argv = [python, "-m", "buffer", *base]
        elif slot.kind == "rollout":
            argv = [python, "-m", "rollout_server", *base, *slot.overrides]
        elif slot.kind == "teacher":  # the key comes from the environment, as every engine's
            argv = [python, "-m", "rollout_server.engine", *base, *slot.overrides,
                    "--host", topo.host, "--port", str(slot.metrics_port)]
        else:
            own = [*base, *trainer_overrides(cfg), *trainer_args]
            argv = _trainer_argv(python, cfg.launch.trainer_ranks, topo.host, own,
                                 Path(cfg.run_dir) / "logs" / "torchrun")
        gpus = ({} if slot.gpus is None
                else {"CUDA_VISIBLE_DEVICES": visible_devices(slot.gpus, inherited)})
        threads = {} if slot.threads is None else {"OMP_NUM_THREADS": str(slot.threads),
                                                   "MKL_NUM_THREADS": str(slot.threads)}
        # a user's own setting wins (a wait policy over a spin count too)
        own = {k: v for k, v in slot.env
               if k not in os.environ
               and not (k.startswith("GOMP_") and "OMP_WAIT_POLICY" in os.environ)}
        specs.append(ProcSpec(name=slot.name, argv=argv, env={**env, **gpus, **threads, **own},
                              health_url=health,
                              stage=start_stage(slot.kind, shared), main=slot.kind == "trainer",
                              cpus=slot.cpus,
                              health_timeout_s=engine_start_s(cfg)
                              if slot.kind in ("rollout", "teacher") else None))
    return specs


def trainer_overrides(cfg: RunConfig) -> list[str]:
    """The trainer's own ``key=value`` (``launch/srun.py`` passes the same): the final evaluation's
    server may register after the last push, so the trainer waits for it."""
    return ["eval.await_server=true"] if wants_eval(cfg) and cfg.eval.at_end else []


def shares_gpu(cfg: RunConfig) -> bool:
    """Whether a trainer rank and an engine share a GPU (the one-GPU layout of placement.py)."""
    return any(n.shared for n in place_nodes(cfg) or ())


def start_stage(kind: str, shared: bool) -> int:
    """The buffer and the teacher first, then the rollout servers and the trainer together; on
    one shared GPU the trainer once every engine is up (SGLang sizes its KV cache from the memory
    free after loading)."""
    return 0 if kind in ("buffer", "teacher") else 2 if kind == "trainer" and shared else 1


def engine_start_s(cfg: RunConfig) -> float:
    """How long a rollout server may take to become healthy: its engine's start-up, plus margin."""
    return cfg.rollout.engine.startup_timeout_s + 60


def _trainer_argv(python: str, ranks: int, host: str, base: list[str], log_dir: Path):
    """``torchrun -m trainer`` for several ranks; one rank is ``python -m trainer`` itself (no agent
    process importing torch beside it: ~1.5 s of CPU at start-up on a 2-core machine). torchrun's
    own files go to ``log_dir`` (without one it leaves a directory in /tmp per start)."""
    if ranks == 1:
        return [python, "-m", "trainer", *base]

    # a fresh rendezvous port per (re)start: the old one may linger in TIME_WAIT
    def argv() -> list[str]:
        return [python, "-m", "launch.torchrun", "--nnodes", "1",
                "--nproc-per-node", str(ranks),
                "--master-addr", host, "--master-port", str(free_port()), "--max-restarts", "0",
                "--log-dir", str(log_dir), "-m", "trainer", *base]
    return argv


def write_ports(run_dir: Path, topo: Topology, sup: Supervisor,
                pools: dict[str, int] | None = None, hosts: list[str] | None = None) -> None:
    """``ports.json`` (``pools``: the sizes a scale left, launch/scale.py), the targets and the
    daemons in job.json; ``hosts``: each node's address (several nodes, ``launch/ray_job.py``)."""
    pids = sup.pids()
    info = {**topo.to_json(hosts), "run_dir": str(run_dir), "supervisor_pid": os.getpid(),
            "ports": topo.ports(), **({"pools": pools} if pools else {})}
    for d in info["daemons"]:
        d["pid"] = pids.get(d["name"])
    write_json_atomic(run_dir / "ports.json", info)
    write_job(run_dir, state="running", daemons=info["daemons"])
    write_targets(run_dir, topo, sup, hosts)


def write_targets(run_dir: Path, topo: Topology, sup: Supervisor,
                  hosts: list[str] | None = None) -> None:
    """``prometheus_targets.json``: the daemons that ``scraped`` says Prometheus should scrape (not
    the teacher: an engine's /metrics wants the job's key)."""
    targets = [{"targets": [urlsplit(d["metrics_url"]).netloc],
                "labels": {"daemon": d["name"], "kind": d["kind"], "run": run_dir.name}}
               for d in topo.to_json(hosts)["daemons"]
               if d["kind"] != "teacher" and scraped(sup.proc(d["name"]))]
    write_json_atomic(run_dir / "prometheus_targets.json", targets)


def scraped(p) -> bool:
    """Whether Prometheus should scrape the supervised process ``p``: started (a trainer that
    waits for a slow engine paged TrainerDown) and alive or to be restarted (a completed trainer
    during the final evaluation did)."""
    return p.popen is not None and (p.popen.poll() is None or p.restart_at is not None)


class Monitor:
    """on_tick: the live progress line, the periodic /metrics scrape and the tracker sink's
    polls."""

    def __init__(self, cfg: RunConfig, topo: Topology, run_dir: Path, out=sys.stderr,
                 since: int = 0, sink: TrackerSink | None = None,
                 settings: RunConfig | None = None, hosts=lambda: None):
        self.cfg, self.topo, self.run_dir, self.out, self.sink = cfg, topo, run_dir, out, sink
        self.hosts = hosts  # () -> each node's address (several nodes), or None
        # a resume's accepted changes: into settings.yaml once a step trained with them, so a
        # resume that the trainer (or a rollout server) refuses leaves settings.yaml as it was
        self.settings = settings
        # this invocation's steps, each line read once
        self.tail = JsonlTail(trainer_jsonl(run_dir), since)
        # the last SUMMARY_WINDOW steps' records (a replayed step: the last)
        self.recent: list[dict] = []
        self.t0 = time.monotonic()
        # (every how many seconds, what), each first on the first tick
        self.tasks = [(PROGRESS_EVERY_S, self.print_progress), (SCRAPE_EVERY_S, self.scrape),
                      *([(TRACK_EVERY_S, sink.poll)] if sink is not None else [])]
        self.due = [0.0] * len(self.tasks)
        self.scrapes = rotating_file(run_dir / "metrics" / "scrape.jsonl", log_bytes(cfg),
                                     cfg.launch.log_backups)

    def __call__(self, sup: Supervisor) -> None:
        now = time.monotonic()
        for i, (every_s, task) in enumerate(self.tasks):
            if now >= self.due[i]:
                self.due[i] = now + every_s
                task()

    def print_progress(self) -> None:
        self.out.write(self.progress_line() + "\n")
        self.out.flush()

    def read(self) -> None:
        """This invocation's new step records; the first one writes the pending settings."""
        self.recent = last_per([*self.recent, *self.tail.read()], step_of)[-SUMMARY_WINDOW:]
        if self.recent and self.settings is not None:
            with contextlib.suppress(OSError):  # a full disk: the next read tries again
                write_settings(self.settings)
                self.settings = None

    def progress_line(self) -> str:
        self.read()
        elapsed = time.monotonic() - self.t0
        if not self.recent:
            return f"[run] waiting for the first trainer step ... {elapsed:.0f}s"
        last, total = self.recent[-1], self.cfg.trainer.steps
        window = [reward_of(r) for r in self.recent]
        done = min(total, last["step"])  # counts resumed steps
        bar = "#" * int(20 * done / total) + "." * (20 - int(20 * done / total))
        return (f"[run] [{bar}] step {done}/{total}  reward {sum(window) / len(window):.3f}  "
                f"version {last.get('policy_version', '?')}  {elapsed:.0f}s")

    def scrape(self) -> None:
        from areal_like.net.metrics import scrape

        for d in self.topo.to_json(self.hosts())["daemons"]:
            if d["kind"] == "teacher":  # an engine's /metrics wants the job's key
                continue
            try:
                values = scrape(d["metrics_url"])
            except Exception:
                continue  # down or restarting: the supervisor reports that
            values = {k: v for k, v in values.items()
                      if k.startswith("areal_") and "_bucket{" not in k}
            write_line(self.scrapes, json.dumps({"t": round(time.time(), 3), "daemon": d["name"],
                                                 "values": values}))

    def close(self) -> None:
        self.scrapes.close()


def log_bytes(cfg: RunConfig) -> int:  # where a daemon log or scrape.jsonl rotates
    return int(cfg.launch.log_max_mb * (1 << 20))


def wait_for_final_eval(cfg: RunConfig, run_dir: Path, sup: Supervisor,
                        poll_s: float = 1.0) -> bool:
    """After the trainer completed: whether the evaluating server wrote THIS run's final evaluation
    (``has_final_eval``) within ``eval.final_timeout_s``. Gives up at once when that server is
    down: nothing restarts it now, and only the trainer, gone now, could push it the weights."""
    deadline = time.monotonic() + cfg.eval.final_timeout_s
    print("[run] trainer done; waiting for the final evaluation", file=sys.stderr, flush=True)
    why = "stop requested"
    while not sup.stop_event.is_set():
        # liveness first, the file second: a server that wrote the record and then exited counts
        down = sup.pids().get("rollout-0") is None
        if has_final_eval(run_dir, cfg.trainer.steps):
            return True
        left = deadline - time.monotonic()
        if down or left <= 0:
            why = ("the evaluating rollout server is down" if down
                   else f"not written within eval.final_timeout_s={cfg.eval.final_timeout_s}")
            break
        sup.stop_event.wait(min(poll_s, left))
    print(f"[run] no final evaluation: {why}", file=sys.stderr, flush=True)
    return False


def on_trainer_done(cfg: RunConfig, run_dir: Path, topo: Topology, sup: Supervisor,
                    hosts: list[str] | None = None) -> None:
    """The trainer completed: Prometheus stops scraping it (``scraped``; its port is closed:
    TrainerDown paged during a final evaluation longer than 2 minutes); warm the plotting imports;
    wait for a scheduled final evaluation."""
    write_targets(run_dir, topo, sup, hosts)
    warm_plotting()
    if wants_eval(cfg) and cfg.eval.at_end:
        wait_for_final_eval(cfg, run_dir, sup)


def _supervisor_lines_only(line: str) -> None:
    if line.startswith("[supervisor]"):
        print(line, file=sys.stderr, flush=True)


def report_failure(run_dir: Path, daemon: str, out=sys.stderr, refused: bool = False) -> None:
    """The failing daemon's last error lines, so that a failed job says why (also with ``-q``);
    for one that refused to start (``refused``), its refusal as one ``error:`` line."""
    log = run_dir / "logs" / f"{daemon}.log"
    if refused and (line := refusal(log)) is not None:
        out.write(f"error: {line}\n[run] {daemon} refused to start; its log: {log}\n")
        out.flush()
        return
    lines = error_tail(log)
    out.write(f"[run] {daemon} failed; the end of {log}:\n"
              + "".join(f"    {ln}\n" for ln in lines))
    out.flush()


@dataclasses.dataclass(frozen=True)
class Before:
    """What a start found in its run_dir and may change there (``start_job``): put back after a
    job in which no step trained (``restore``)."""

    settings: bytes | None  # settings.yaml (``file_state``)
    config: bytes | None  # config.yaml
    accepted: RunConfig | None  # a resume's changed settings: settings.yaml's once a step trained
    job: bytes | None  # job.json: a refused start is not the run `status` and `top` show

    def restore(self, run_dir: Path, refused: bool) -> None:
        """config.yaml as it was when it got changed settings, or the start was ``refused``;
        settings.yaml and job.json when refused."""
        if refused or self.accepted is not None:
            restore_file(run_dir / "config.yaml", self.config)
        if refused:
            restore_file(run_dir / SETTINGS_FILE, self.settings)
            restore_file(run_dir / JOB_FILE, self.job)


def start_job(cfg: RunConfig, accept_changes: bool) -> tuple[RunConfig, Topology, Path, int, int,
                                                              Before]:
    """Steps 0-2 of ``run_job`` on a checked config: (the daemons' config, topology, config.yaml,
    the step resumed from, the run_dir lock's descriptor, what the run_dir held before). A run_dir
    this call created is removed again when it fails (a ConfigError, Ctrl-C, a warm start that
    crashed): no daemon ran in it; in one that was there, settings.yaml is as it was."""
    from launch.warmstart import ensure_warm_start

    run_dir = Path(cfg.run_dir).resolve()
    fresh = not run_dir.exists()
    lock = lock_run_dir(run_dir)  # released by the kernel when this job's last process is gone
    settings, job = file_state(run_dir / SETTINGS_FILE), file_state(run_dir / JOB_FILE)
    write_job(run_dir, state="starting", started=time.time(), supervisor_pid=os.getpid(),
              supervisor_born=psutil.Process().create_time())
    try:
        resumed_from = check_existing_run(cfg)
        # also before the first checkpoint: the buffer's WAL and the version labels go on
        changes = check_resume_settings(cfg, accept_changes)
        check_checkpoint_model(cfg, changes)  # before settings.yaml, warm start and config.yaml
        for change in changes:
            print(f"[run] resuming with a changed setting: {change}", file=sys.stderr, flush=True)
        if resumed_from:
            print(f"[run] resuming at step {resumed_from} of {cfg.trainer.steps}"
                  + (": trained; its final evaluation is missing, so it runs now"
                     if resumed_from == cfg.trainer.steps else ""), file=sys.stderr, flush=True)
        # as given, before the warm start's model path
        before = Before(settings, file_state(run_dir / "config.yaml"), cfg if changes else None,
                        job)
        if not changes:  # changed settings reach it once a step trained with them (Monitor)
            write_settings(cfg)
        plan_job(cfg)  # a layout that does not fit is refused now, not after the warm start
        cfg = ensure_warm_start(cfg, log=lambda m: print(f"[warm-start] {m}", file=sys.stderr,
                                                         flush=True))
        return (*prepare(cfg), resumed_from, lock, before)
    except BaseException:
        if fresh:
            os.close(lock)
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            restore_file(run_dir / SETTINGS_FILE, settings)
            restore_file(run_dir / JOB_FILE, job)
        raise


def check_checkpoint_model(cfg: RunConfig, changes: list[str]) -> None:
    """ConfigError naming the accepted ``model.*`` (``trainer.lora.*``) changes of a resume when the
    model they build has other shapes than its newest checkpoint's: the trainer would refuse it
    (``trainer/checkpoint.py``, ``refuse_other_settings``), after the warm start had trained the
    new model and config.yaml had been rewritten. A checkpoint whose ``.metadata`` is empty, cut
    short or planted is refused here as the trainer would; one the OS cannot read is left to the
    trainer, which names it."""
    from areal_like.daemon import StartRefused

    keys = [c for c in changes if c.startswith(("model.", "trainer.lora."))]
    root = cfg.resolve_path(cfg.trainer.checkpoint_dir)
    if not keys or latest_checkpoint_step(root) is None:
        return
    from trainer.checkpoint import latest_checkpoint, refuse_other_settings

    try:
        refuse_other_settings(latest_checkpoint(root), cfg.model, cfg.trainer.lora,
                              f"these settings changed it ({'; '.join(keys)}): resume without "
                              "those changes, or use a new run_dir")
    except StartRefused as e:  # UnsafeCheckpointError (planted) is one too
        raise ConfigError(str(e)) from None
    except OSError:
        return


class Local:
    """Where ``run_job`` starts the daemons: this machine (``launch/ray_job.py``'s ``RayCluster``
    places them on a Ray cluster through the same supervisor)."""

    def specs(self, cfg: RunConfig, topo: Topology, config_path: Path,
              trainer_args: list[str] | None = None) -> list[ProcSpec]:
        return job_specs(cfg, topo, config_path, trainer_args=trainer_args or ())

    def hosts(self) -> list[str] | None:  # each node's address: one node, the topology's
        return None

    def tick(self, sup: Supervisor) -> None:
        pass


def supervisor(cfg: RunConfig, topo: Topology, config_path: Path, lock: int, echo,
               monitor: Monitor, cluster) -> Supervisor:
    """``run_job``'s supervisor of the job's daemons (started where ``cluster`` starts them), with
    its ``Scaler`` (launch/scale.py), ports.json and the trainer's completion."""
    run_dir = Path(cfg.run_dir)
    scaler = Scaler(cfg, topo, run_dir,
                    lambda c, t, extra: cluster.specs(c, t, config_path, trainer_args=extra),
                    lambda t, pools, s: (setattr(monitor, "topo", t),
                                         write_ports(run_dir, t, s, pools, cluster.hosts())),
                    layout=getattr(cluster, "scale_layout", None))
    sup = Supervisor(cluster.specs(cfg, topo, config_path), run_dir, restarts=cfg.launch.restarts,
                     restart_window_s=cfg.launch.restart_window_s,
                     restart_backoff_s=cfg.launch.restart_backoff_s,
                     restart_backoff_max_s=cfg.launch.restart_backoff_max_s,
                     health_timeout_s=cfg.launch.health_timeout_s, echo=echo,
                     on_tick=lambda s: (monitor(s), scaler(s), cluster.tick(s)),
                     on_change=lambda s: write_ports(run_dir, scaler.topo, s, scaler.sizes,
                                                     cluster.hosts()),
                     inherit_fds=(lock,),
                     log_max_bytes=log_bytes(cfg), log_backups=cfg.launch.log_backups)
    sup.on_complete = lambda s: on_trainer_done(cfg, run_dir, scaler.topo, s, cluster.hosts())
    return sup


def run_job(cfg: RunConfig, quiet: bool = False, accept_changes: bool = False,
            cluster=None) -> int:
    """``areal-like run``: returns the exit code; prints the summary as one JSON line on stdout.
    Raises ConfigError (before anything started) when an input is unusable or run_dir refuses
    (a resume with changed settings too, unless ``accept_changes``). ``cluster``: where the
    daemons start (default ``Local``)."""
    t0 = time.monotonic()
    if cluster is None:  # several nodes: launch/slurm, Ray or launch/MULTINODE.md
        check_one_node(cfg)
        cluster = Local()
    # hub ids resolved, inputs and tracker packages checked: before anything starts
    cfg = checked(cfg)
    cfg, topo, config_path, resumed_from, lock, before = start_job(cfg, accept_changes)
    run_dir = Path(cfg.run_dir)
    jsonl = trainer_jsonl(run_dir)
    since = jsonl.stat().st_size if jsonl.is_file() else 0  # what earlier invocations trained
    echo = _supervisor_lines_only if quiet else None
    sink = TrackerSink.from_config(cfg)
    monitor = Monitor(cfg, topo, run_dir, since=since, sink=sink,
                      settings=before.accepted, hosts=cluster.hosts)
    try:
        sup = supervisor(cfg, topo, config_path, lock, echo, monitor, cluster)
        sup.install_signals()
        print(f"[run] run_dir {run_dir}  (logs in {run_dir / 'logs'}; "
              f"`areal-like top {run_dir}` for a live view)",
              file=sys.stderr, flush=True)
        if note := idle_gpus(cfg):
            print(f"[run] {note}", file=sys.stderr, flush=True)
        code = sup.run()
        # every daemon has stopped: Prometheus drops their targets (else TrainerDown and
        # EngineUnhealthy page for a job that ended, and it scrapes whatever takes its ports next)
        write_json_atomic(run_dir / "prometheus_targets.json", [])
        monitor.read()  # a step trained since the last tick accepts the settings too
        untrained = not monitor.recent or monitor.settings is not None  # (or none was accepted)
        refused = untrained and code == REFUSED_EXIT  # leaves the run_dir as it found it
        if untrained:
            before.restore(run_dir, refused=refused)
        if code != 0 and sup.failed is not None:
            report_failure(run_dir, sup.failed, refused=code == REFUSED_EXIT)
        summary = summarize(run_dir, time.monotonic() - t0, code, since=since,
                            resumed_from=resumed_from, trainer_steps=cfg.trainer.steps,
                            checkpoint=newest_checkpoint(cfg))
        if not refused:
            write_job(run_dir, state="ended", summary=summary)
        if summary["end"] == "stopped":
            print(stopped_line(summary), file=sys.stderr, flush=True)
        if not summary.get("learning", {}).get("ok", True):  # it ran: the exit code stays
            print(f"[run] not learning: {summary['learning']['reason']}; what to try: "
                  f"{summary['learning']['what_to_try']}", file=sys.stderr, flush=True)
        sink.poll(final=True)  # every daemon has stopped: the files are complete
    finally:
        sink.close()
        monitor.close()
    print(json.dumps(summary), flush=True)
    return code


def newest_checkpoint(cfg: RunConfig) -> str | None:
    """The directory of the run's newest complete checkpoint (``v%08d``), or None."""
    root = cfg.resolve_path(cfg.trainer.checkpoint_dir)
    step = latest_checkpoint_step(root)
    return None if step is None else str(root / f"{CHECKPOINT_PREFIX}{step:08d}")


def stopped_line(summary: dict) -> str:
    """The console's line for a job stopped before its end (``summarize``'s ``end``): where it
    stopped, and what to do with its newest checkpoint (a stop exports nothing: the trainer has
    seconds to stop, and an export of a large model takes longer)."""
    ckpt = summary.get("checkpoint")
    where = (f"[run] stopped at step {summary['policy_version']} of {summary['trainer_steps']}; "
             "the same command again resumes it")
    if ckpt is None:
        return f"{where} (no checkpoint yet: from the start)"
    out = Path(summary["run_dir"]) / "export" / Path(ckpt).name
    model = (f"exported as {out}" if out.is_dir()
             else f"`areal-like export {ckpt} {out}` makes a Hugging Face model of it")
    return f"{where}; last checkpoint {ckpt}: {model}"
