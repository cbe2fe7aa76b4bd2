"""launch/slurm/areal_like.sbatch under a real one- or two-node Slurm started by the test.

One node: munged, slurmctld and slurmd (no cgroups, 8 CPUs via config_overrides and an lscpu
stand-in, GPUS_PER_NODE=2 with no GPUs: the engine is sglang_standin). Two nodes: each slurmd in
its own network/UTS/mount namespace (test_hosts_netns.py's bridge). Needs root, slurm-wlm and
munge: skipped without them, except in CI. Every daemon is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from test_hosts_netns import hosts  # noqa: F401  (the fixture: hosts on a bridge)

from areal_like.net.distributed import free_port
from launch.records import step_records, trainer_done
from launch.top import job_end
from tests.conftest import child_env, wait_until

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scancel", "scontrol", "sinfo")
JOB_S = 540.0  # ~80 s alone; the whole suite shares the cores
CPUS = 8
RESTARTS = 3  # the script's default
LSCPU = ("#!/bin/bash\necho '# CPU,Core,Socket'; "
         f"for c in $(seq 0 {CPUS - 1}); do echo \"$c,$c,0\"; done\n")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")


def _need_slurm() -> None:
    missing = [b for b in BINARIES if shutil.which(b) is None]
    why = (f"Slurm is not installed (missing {', '.join(missing)}: apt-get install slurm-wlm munge)"
           if missing else "slurmd runs as root: this test needs root" if os.geteuid() else None)
    if why and os.environ.get("CI") == "true":
        pytest.fail(f"{why}; CI must run this test (.ci/run installs Slurm)")
    if why:
        pytest.skip(why)


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]
    # what the commands run under: on namespaced hosts, host 0's network (where slurmctld listens)
    within: tuple[str, ...] = ()

    def cmd(self, *args: str) -> str:
        return subprocess.run([*self.within, *args], env=self.env, check=True,
                              capture_output=True, text=True, timeout=30).stdout

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s fields of ``job_id``."""
        line = self.cmd("scontrol", "show", "job", "--oneliner", job_id)
        return dict(f.split("=", 1) for f in line.split() if "=" in f)

    def wait_ended(self, job_id: str, timeout_s: float = JOB_S) -> dict[str, str]:
        def ended() -> dict[str, str] | None:
            job = self.job(job_id)
            return job if job["JobState"] in ENDED else None
        return wait_until(ended, timeout_s, 1.0, f"job {job_id} to end ({self.logs()})")

    def logs(self) -> str:
        return f"Slurm's logs in {self.root / 'log'}"


def _conf(root: Path, ctld: str, nodes: list[tuple[str, str]], ports: tuple[int, int]) -> str:
    """slurm.conf: slurmctld at ctld, a node per (name, address), each with its own files."""
    mem_mb = psutil.virtual_memory().total // 2**20 - 1024  # slurmd drains a node that has less
    lines = "".join(f"NodeName={name} NodeAddr={addr} CPUs={CPUS} RealMemory={mem_mb} "
                    "State=UNKNOWN\n" for name, addr in nodes)
    return f"""\
ClusterName=arealci
SlurmctldHost={ctld}
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.sock
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=30
SlurmdParameters=config_overrides
{lines}PartitionName=ci Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _stop_daemon(pid_file: Path) -> None:
    """SIGTERM the daemon whose PID ``pid_file`` holds, SIGKILL it after 20 s."""
    try:
        proc = psutil.Process(int(pid_file.read_text()))
    except (OSError, ValueError, psutil.Error):
        return
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except psutil.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def _cluster(ctld: str, nodes: list[tuple[str, str]],
             wrap: Callable[[str | None], list[str]] = lambda _node: [],
             within: tuple[str, ...] = ()) -> Iterator[Cluster]:
    """munged, slurmctld and a slurmd per node under wrap(node), until every node is idle."""
    _need_slurm()
    root = Path(tempfile.mkdtemp(prefix="al-slurm-"))  # short: the munge socket's path
    for sub in ("state", "log", *(f"spool-{name}" for name, _ in nodes)):
        (root / sub).mkdir()
    (root / "munge.key").write_bytes(os.urandom(1024))
    (root / "munge.key").chmod(0o400)
    (root / "slurm.conf").write_text(_conf(root, ctld, nodes, (free_port(), free_port())))
    env = child_env({"SLURM_CONF": str(root / "slurm.conf")})
    started = []
    try:
        # munged runs as root only when forced; each daemon forks and writes its PID file
        subprocess.run(["munged", "--force", f"--key-file={root}/munge.key",
                        f"--socket={root}/munge.sock", f"--pid-file={root}/munged.pid",
                        f"--log-file={root}/log/munged.log", f"--seed-file={root}/munged.seed"],
                       check=True, timeout=30)
        started.append(root / "munged.pid")
        for node, daemon, args in [(None, "slurmctld", ["-i"]),
                                   *((name, "slurmd", []) for name, _ in nodes)]:
            subprocess.run([*wrap(node), daemon, *args], env=env, check=True, timeout=30)
            started.append(root / (f"slurmd-{node}.pid" if node else "slurmctld.pid"))
        cluster = Cluster(root, env, within)
        wait_until(lambda: set(cluster.cmd("sinfo", "-h", "-N", "-o", "%t").split()) == {"idle"},
                   60, 0.5, f"every node to be idle ({cluster.logs()})")
        yield cluster
    finally:
        for pid_file in reversed(started):
            _stop_daemon(pid_file)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm() -> Iterator[Cluster]:
    host = socket.gethostname().split(".")[0]
    with _cluster(f"{host}(127.0.0.1)", [(host, "127.0.0.1")]) as cluster:
        yield cluster


def _model(path: Path) -> None:
    from areal_like.settings.config import load_config
    from areal_like.tasks.tokenizer import char_tokenizer
    from areal_like.weights.hf import build_model

    build_model(load_config([]).model).save_pretrained(path)
    char_tokenizer().save_pretrained(path)  # a model directory carries its tokenizer


def _submit(slurm: Cluster, tmp_path: Path, steps: int, restarts: int, nodes: int = 1,
            **knobs: str) -> tuple[str, Path]:
    """sbatch a quickstart-sized CPU job on nodes nodes with knobs: (job id, run dir)."""
    _model(tmp_path / "model")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/lscpu").write_text(LSCPU)
    (tmp_path / "bin/lscpu").chmod(0o755)
    run_dir = tmp_path / "run"
    env = {**slurm.env, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{slurm.env['PATH']}",
           "PYTHONPATH": f"{HERE / 'sglang_standin'}{os.pathsep}{REPO}",
           "GPUS_PER_NODE": "2", "HEAD_IFACE": "lo", "RUN_DIR": str(run_dir),
           "BUFFER_PORT": str(free_port()), "PUB_PORT": str(free_port()),
           "TRAINER_PORT": str(free_port()), "METRICS_BASE": str(free_port()),
           "RESTARTS": str(restarts), "RESTART_BACKOFF_S": "1",
           "VENV": sys.prefix,  # the script's `python` is this test's interpreter
           "AREAL_LIKE_STANDIN_CONFIG": str(run_dir / "config.yaml"),
           "AREAL_LIKE_STANDIN_PIDS": str(tmp_path / "engine.pids"), **knobs}
    env.pop("AREAL_LIKE_ENGINE_API_KEY", None)
    out = subprocess.run(
        [*slurm.within, "sbatch", "--parsable", f"--nodes={nodes}", "--gpus-per-node=0",
         f"--output={tmp_path}/job.out",
         "launch/slurm/areal_like.sbatch", f"model.path={tmp_path / 'model'}",
         "trainer.device=cpu", "rollout.engine.device=cpu", "model.dtype=float32",
         "warm_start.steps=0", f"trainer.steps={steps}"],
        env=env, cwd=REPO, check=True, capture_output=True, text=True, timeout=30).stdout
    return out.strip().split(";")[0], run_dir


def _gone(pids: list[int]) -> bool:
    return all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE
               for p in pids)


def _engine_pids(tmp_path: Path) -> list[int]:
    return [int(p) for p in (tmp_path / "engine.pids").read_text().split()]


def _job_processes(run_dir: Path) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"])
            if p.pid != os.getpid() and any(str(run_dir) in c for c in p.info["cmdline"] or [])]


def _rollout_servers(run_dir: Path) -> list[psutil.Process]:
    """This job's rollout servers (python -m rollout_server), not their wrappers."""
    return [p for p in _job_processes(run_dir)
            if p.info["cmdline"][1:3] == ["-m", "rollout_server"]]


def _steps(run_dir: Path) -> int:
    return len(step_records(run_dir))


def _logs(tmp_path: Path, run_dir: Path, lines: int = 25) -> str:
    """The last ``lines`` of the job's output and of every daemon's log, for a failure message."""
    out = []
    for log in [tmp_path / "job.out", *sorted(run_dir.glob("*.log"))]:
        text = log.read_text(errors="replace").splitlines() if log.is_file() else ["(none)"]
        out.append(f"--- {log.name}\n" + "\n".join(text[-lines:]))
    return "\n".join(out)


@pytest.mark.timeout(720)
def test_a_killed_rollout_step_restarts_and_scancel_stops_the_job_as_ctrl_c_does(
        slurm, tmp_path):
    steps = 10_000
    job_id, run_dir = _submit(slurm, tmp_path, steps=steps, restarts=RESTARTS)
    try:
        _restart_and_cancel(slurm, job_id, run_dir, tmp_path)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{_logs(tmp_path, run_dir)}") from e
    finally:
        subprocess.run(["scancel", job_id], env=slurm.env, timeout=30)
    job = slurm.job(job_id)
    assert job["JobState"] == "CANCELLED", job
    done = trainer_done(run_dir)  # the trainer stopped as on Ctrl-C: its done record, early
    assert done is not None and 1 <= done["policy_version"] < steps, done
    ports = json.loads((run_dir / "ports.json").read_text())
    assert job_end(run_dir, ports).startswith("stopped at step"), job_end(run_dir, ports)


def _restart_and_cancel(slurm: Cluster, job_id: str, run_dir: Path, tmp_path: Path) -> None:
    wait_until(lambda: _steps(run_dir) >= 1, JOB_S, 1.0, "the first trained step")
    [server] = _rollout_servers(run_dir)
    first_engines = _engine_pids(tmp_path)
    # an earlier exit (a slow start on a loaded machine) used a restart already: count from here
    restarts = (run_dir / "rollout-0.log").read_text().count("; restart ")
    os.kill(server.pid, signal.SIGKILL)  # with_restarts.sh starts it again (RESTARTS)

    def restarted() -> list[psutil.Process]:
        state = slurm.job(job_id)["JobState"]
        assert state == "RUNNING", f"the job is {state} after the rollout server's kill"
        return [p for p in _rollout_servers(run_dir) if p.pid != server.pid]

    wait_until(restarted, 120, 0.5, "the rollout server's restart")
    wait_until(lambda: len(_engine_pids(tmp_path)) > len(first_engines), 120, 0.5,
               "the restarted server's engine")
    assert f"restart {restarts + 1}/{RESTARTS}" in (run_dir / "rollout-0.log").read_text()
    at_restart = _steps(run_dir)
    wait_until(lambda: _steps(run_dir) > at_restart, 240, 1.0, "a step trained after the restart")
    family = [p.pid for p in _job_processes(run_dir)] + _engine_pids(tmp_path)
    slurm.cmd("scancel", job_id)
    slurm.wait_ended(job_id, 120)
    wait_until(lambda: _gone(family), 60, 0.5, "every daemon of the job to exit")


# ---- two nodes: hosts of their own (network and UTS namespaces, test_hosts_netns.py's bridge)


@pytest.fixture
def two_nodes(request, tmp_path_factory) -> Iterator[tuple[Cluster, str]]:
    """Slurm nodes n0 and n1, each its own host (netns, hostname, /etc/hosts)."""
    names, addrs = request.getfixturevalue("hosts")
    etc_hosts = tmp_path_factory.mktemp("hosts") / "hosts"
    etc_hosts.write_text(f"127.0.0.1 localhost\n{addrs[0]} n0 ctl\n{addrs[1]} n1\n")

    def wrap(node: str | None) -> list[str]:  # nsenter: /sys stays the host's (cgroups, for slurmd)
        return ["nsenter", f"--net=/run/netns/{names[node == 'n1']}", "unshare", "--uts",
                "--mount", "sh", "-c", f'mount --bind {etc_hosts} /etc/hosts && '
                f'hostname {node or "ctl"} && exec "$0" "$@"']

    with _cluster(f"ctl({addrs[0]})", [("n0", addrs[0]), ("n1", addrs[1])], wrap,
                  within=("nsenter", f"--net=/run/netns/{names[0]}")) as cluster:
        yield cluster, f"{names[0].rsplit('-', 1)[0]}-br"


@pytest.mark.timeout(720)
def test_sbatch_runs_a_job_across_two_nodes_of_their_own(two_nodes, tmp_path):
    """Buffer and trainer on n0, rollout on n1: 3 steps, the final eval, nothing left."""
    slurm, bridge = two_nodes
    job_id, run_dir = _submit(slurm, tmp_path, steps=3, restarts=0, nodes=2, GPUS_PER_NODE="1",
                              HEAD_IFACE=bridge)
    try:
        job = slurm.wait_ended(job_id)
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            slurm.cmd("scancel", job_id)
    logs = _logs(tmp_path, run_dir)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), logs
    assert job["NodeList"] == "n[0-1]", job
    where = {row.split("\t")[0]: row.split("\t")[2]
             for row in (run_dir / "steps.tsv").read_text().splitlines()}
    assert {name: "--nodelist=n1" in cmd for name, cmd in where.items()} == {
        "buffer": False, "rollout-0": True, "trainer": False}, where
    urls = {d["name"]: d["metrics_url"]
            for d in json.loads((run_dir / "ports.json").read_text())["daemons"]}
    assert urls["rollout-0"].startswith("http://n1:"), urls
    guard = [json.loads(line)
             for line in (run_dir / "metrics/trainer.jsonl").read_text().splitlines()
             if '"logprob_guard"' in line]
    assert [g["passed"] for g in guard] == [["rollout-0"]], guard  # the first push waited
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert any(e.get("final") and e.get("policy_version") == 3 for e in evals), evals
    done = trainer_done(run_dir)
    assert done is not None and done["policy_version"] == 3, done
    assert _gone(_engine_pids(tmp_path))
    wait_until(lambda: not _job_processes(run_dir), 60, 0.5, "every process of the job to exit")
