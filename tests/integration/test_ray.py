"""``areal-like run launch.cluster=ray`` on a real local three-node Ray cluster (launch/RAY.md).

Ray's security: without the token no task, no job; the launcher refuses no token, a readable token
file, or a cluster serving tokenless clients. One quickstart job: seen by status/top/ports.json,
scaled to three servers and back, survives a lost rollout node (books balance), stops as Ctrl-C
does, learns (>= 0.3). Bad inputs are one error line, exit 2. Needs Ray (skipped without, but CI).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from system_harness import warm_model

from areal_like.net.distributed import free_port
from areal_like.wire import protocol as P
from launch.local import LOG_START
from launch.records import step_records, trainer_done
from tests.conftest import child_env, wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
JOB = ["launch.cluster=ray", "launch.nodes=3", "launch.train_nodes=1", "launch.trainer_ranks=1",
       "launch.num_rollout_servers=1", "warm_start.steps=0", "task.group_size=4",
       "buffer.groups_per_step=4", "buffer.lease_timeout_s=15", "buffer.heartbeat_timeout_s=8",
       "eval.every=0", "eval.at_end=false", "launch.restart_backoff_s=0.5"]
# the quickstart (its recipe and batch) from the warm start the other system tests share
LEARN = [*(a for a in JOB if not a.startswith(("task.group_size", "buffer.groups_per_step"))),
         "experiment=quickstart", "trainer.steps=100000", "trainer.checkpoint_every=100000"]
WARM_CACHE = Path(tempfile.gettempdir()) / "areal-like-test-warmstart"  # shared with test_e2e.py
# Ray marks a node dead after this many missed 1 s health checks (default 5 x 3 s); more than 3 on
# a loaded machine, where a live raylet missed 3 and Ray ended it
SYSTEM = {"health_check_period_ms": 1000, "health_check_failure_threshold": 8}


def _need_ray():
    try:
        import ray  # noqa: F401
        from ray.cluster_utils import Cluster
    except ImportError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Ray is not installed ({e}); CI must run this test (.ci/run installs "
                        "the ray extra)")
        pytest.skip(f"Ray is not installed: pip install -e '.[ray]' ({e})")
    return Cluster


def _port() -> int:
    """A free port above Ray's worker range (10002-19999), which Ray refuses for its servers."""
    return next(p for p in iter(free_port, 0) if p >= 20000)


class RayNodes:
    """A local Ray cluster per launch/RAY.md: token auth (a 0600 file; auth=False: none)."""

    def __init__(self):
        self.temp = tempfile.mkdtemp(prefix="al-ray-")  # Ray's sessions and logs (short: sockets)
        self.token = secrets.token_hex(32)
        token_file = Path(self.temp) / "auth_token"
        token_file.touch(mode=0o600)
        token_file.write_text(self.token)
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
        self.port, self.dashboard_port, self.client_port = _port(), _port(), _port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: list[subprocess.Popen] = []

    def start(self, tmp: Path, cpus: list[int], auth: bool = True, more: tuple[str, ...] = (),
              wrap: tuple[str, ...] = ()) -> RayNodes:
        """A head (more: its flags; wrap: its argv's prefix) and len(cpus) - 1 workers; node k has
        cpus[k] CPUs."""
        ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
        env = child_env(self.env if auth else {"RAY_AUTH_MODE": "disabled"})
        # the job moves no data through Ray's object store: 100 MB of /dev/shm each, not 30%
        common = ["--disable-usage-stats", "--block", "--object-store-memory=100000000",
                  f"--dashboard-agent-listen-port={_port()}"]
        head = [ray, "start", "--head", f"--port={self.port}", f"--temp-dir={self.temp}",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={self.client_port}",
                f"--system-config={json.dumps(SYSTEM)}", *more]
        for k, n in enumerate(cpus):
            argv = [*wrap, *head] if k == 0 else [ray, "start", f"--address={self.address}"]
            argv = [*argv, f"--num-cpus={n}", f"--resources={json.dumps({f'n{k}': 1})}", *common]
            common[-1] = f"--dashboard-agent-listen-port={_port()}"
            log = tmp / f"ray-node{k}.log"
            with log.open("w") as out:
                node = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            self.nodes.append(node)
            # one node at a time: nodes starting together on one host race for the names of
            # their sockets in the session directory, and one of them never comes up
            wait_until(lambda: "Ray runtime started" in log.read_text()  # noqa: B023
                       or node.poll() is not None, 180, 0.5, f"Ray node {k} to start")  # noqa: B023
            assert node.poll() is None, log.read_text()[-3000:]
        self.run(f"while sum(n['Alive'] for n in ray.nodes()) < {len(cpus)}: time.sleep(0.2)",
                 timeout=180)  # every node joined
        return self

    def client_env(self, token: bool = True, **extra: str) -> dict[str, str]:
        """A client's environment: the cluster's token (launch/RAY.md) or none at all."""
        env = child_env({**(self.env if token else {}), **extra})
        if not token:
            for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
                env.pop(key, None)
        return env

    def driver(self, code: str, token: bool = True, address: str | None = None) -> subprocess.Popen:
        """code in a Ray driver (or ray:// address), with the cluster's token or none."""
        script = f"import time, ray\nray.init(address={address or self.address!r})\n{code}\n"
        return subprocess.Popen([sys.executable, "-c", script], env=self.client_env(token),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run(self, code: str, timeout: float = 120) -> None:
        proc = self.driver(code)
        try:
            _, err = proc.communicate(timeout=timeout)
        finally:
            _kill_tree(proc.pid)
        assert proc.returncode == 0, err[-3000:]

    def shutdown(self) -> None:
        for node in reversed(self.nodes):
            _kill_tree(node.pid)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[RayNodes]:
    _need_ray()
    c = RayNodes()
    try:
        yield c.start(tmp_path_factory.mktemp("ray"), [3, 3, 3])
    finally:
        c.shutdown()


SCALE_TIMEOUT_S = 360  # CI's loaded machine took more than 120 s to add a server (2026-11-27)


def _cli(*args: str, env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=REPO,
                          env=env or child_env(), capture_output=True, text=True, timeout=timeout)


def _refused(result: subprocess.CompletedProcess, *words: str) -> None:
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, (result.returncode, result.stderr)
    assert all(w in errors[0] for w in words), errors[0]
    assert "[supervisor] started" not in result.stderr, result.stderr


@pytest.mark.parametrize("case", ["no ray", "no cluster", "dashboard address"])
def test_no_ray_no_cluster_or_a_dashboard_address_is_one_error_line(tmp_path, case):
    if case == "no ray":
        shadow = tmp_path / "shadow"
        shadow.mkdir()
        (shadow / "ray.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
        env, words = child_env({"PYTHONPATH": f"{shadow}{os.pathsep}{REPO}"}), ("needs Ray",
                                                                                 ".[ray]")
    else:
        _need_ray()
        http = "http://" if case == "dashboard address" else ""
        env = child_env({"RAY_ADDRESS": f"{http}127.0.0.1:{free_port()}"})
        words = (("dashboard address", "HEAD:6379", "ray job submit") if http
                 else ("no Ray cluster at",))
    _refused(_cli("run", *JOB, f"run_dir={tmp_path / 'run'}", env=env), *words)
    assert not (tmp_path / "run").exists()


# a task that leaves proof it ran (the keyless task of the security review printed the job's keys)
TASK = """@ray.remote
def prove(path):
    open(path, "w").write("ran")
ray.get(prove.remote({path!r}), timeout=60)"""


def _jobs_api(cluster: RayNodes, token: str | None, body: dict | None = None) -> tuple[int, object]:
    """Ray's job REST API on the dashboard port, with a Bearer token or none."""
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"{cluster.dashboard}/api/jobs/", headers=headers,
                                 data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None
    except OSError:
        return 0, None  # the dashboard is not up yet


def test_a_client_without_the_token_runs_no_task_and_submits_no_job(cluster, tmp_path):
    """Without the token: no task (GCS driver, Ray Client), no job; with it, each works."""
    keyless = {how: cluster.driver(TASK.format(path=str(tmp_path / how)), token=False,
                                   address=address)
               for how, address in (("driver", None),
                                    ("client", f"ray://127.0.0.1:{cluster.client_port}"))}
    try:
        wait_until(lambda: _jobs_api(cluster, None)[0], 120, 0.5, "the dashboard")
        marker = tmp_path / "job"
        entry = f"{sys.executable} -c \"open('{marker}', 'w').write('ran')\""
        assert _jobs_api(cluster, None, {"entrypoint": entry})[0] == 401
        assert _jobs_api(cluster, "0" * 64, {"entrypoint": entry})[0] == 403  # a wrong token
        status, jobs = _jobs_api(cluster, cluster.token)
        assert status == 200 and not [j for j in jobs if j["entrypoint"] == entry], jobs
        for how, proc in keyless.items():
            _, err = proc.communicate(timeout=180)
            assert proc.returncode != 0 and not (tmp_path / how).exists(), (how, err[-3000:])
    finally:
        for proc in keyless.values():
            _kill_tree(proc.pid)
    # with the token: the same task runs, the same job is taken and runs
    cluster.run(TASK.format(path=str(tmp_path / "with-token")))
    assert (tmp_path / "with-token").read_text() == "ran"
    status, _ = _jobs_api(cluster, cluster.token, {"entrypoint": entry})
    assert status == 200
    wait_until(marker.exists, 120, 0.5, "the job submitted with the token to run")


@pytest.mark.parametrize("more, auth, words", [
    (["trainer.device=cuda", "rollout.engine.device=cuda", "launch.gpus_per_node=1"], {},
     ("node 0 of the layout needs", "1 GPU", "no node of the Ray cluster")),
    (["launch.ray_cpus=2"], {}, ("node 0 of the layout needs 4 CPU", "the largest: 3 CPU")),
    (["launch.nodes=10"], {}, ("the layout needs 11 CPU", "has 9 CPU")),
    # the launcher runs only with a token that only its user reads
    ([], {"RAY_AUTH_MODE": ""}, ("runs only with Ray's token authentication",
                                 "RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN_PATH")),
    ([], {"RAY_AUTH_TOKEN_PATH": "{readable}"}, ("RAY_AUTH_TOKEN_PATH", "mode 0644", "chmod 600")),
    ([], {"RAY_AUTH_TOKEN_PATH": "{missing}"}, ("RAY_AUTH_TOKEN_PATH", "No such file")),
])
def test_a_layout_larger_than_the_cluster_or_a_token_others_read_is_one_error_line(
        cluster, tmp_path, more, auth, words):
    readable = tmp_path / "readable"
    readable.write_text(cluster.token)
    readable.chmod(0o644)
    auth = {k: v.format(readable=readable, missing=tmp_path / "missing") for k, v in auth.items()}
    env = cluster.client_env(RAY_ADDRESS=cluster.address, **auth)
    keys = {a.split("=")[0] for a in more}
    job = [a for a in JOB if a.split("=")[0] not in keys]
    _refused(_cli("run", *job, f"run_dir={tmp_path / 'run'}", *more, env=env), *words)
    assert not (tmp_path / "run").exists()


def test_the_launcher_refuses_a_cluster_that_serves_clients_without_a_token(tmp_path):
    _need_ray()
    open_cluster = RayNodes()
    try:
        open_cluster.start(tmp_path, [3], auth=False, more=("--include-dashboard=false",))
        proc = open_cluster.driver(TASK.format(path=str(tmp_path / "keyless")), token=False)
        try:
            _, err = proc.communicate(timeout=120)
        finally:
            _kill_tree(proc.pid)
        assert proc.returncode == 0 and (tmp_path / "keyless").exists(), err[-3000:]
        env = open_cluster.client_env(RAY_ADDRESS=open_cluster.address)
        _refused(_cli("run", *[a for a in JOB if not a.startswith("launch.nodes")],
                      f"run_dir={tmp_path / 'run'}", env=env),
                 "serves clients without a token", "RAY_AUTH_MODE=token")
        assert not (tmp_path / "run").exists()
    finally:
        open_cluster.shutdown()


def test_a_run_dir_a_node_does_not_see_is_one_error_line(tmp_path):
    _need_ray()
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a mount namespace of its own for the raylet needs root and unshare")
    hidden = tmp_path / "hidden"  # a tmpfs over it in the raylet's mount namespace
    hidden.mkdir()
    nodes = RayNodes()
    try:
        nodes.start(tmp_path, [4], more=("--include-dashboard=false",),
                    wrap=("unshare", "--mount", "sh", "-c",
                          f'mount -t tmpfs tmpfs {hidden} && exec "$0" "$@"'))
        env = nodes.client_env(RAY_ADDRESS=nodes.address)
        _refused(_cli("run", *[a for a in JOB if not a.startswith("launch.nodes")],
                      f"run_dir={hidden / 'run'}", env=env),
                 "is not on storage every node sees", "FileNotFoundError")
    finally:
        nodes.shutdown()


ACTOR = """import time, sys
from areal_like.daemon import popen_tied
popen_tied(sys.argv[1:])
time.sleep(600)
"""
# a stand-in torchrun: a rank in a session of its own, which a signal to its group misses
TORCHRUN = """import os, subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                        start_new_session=True)
open(sys.argv[1], "w").write(f"{os.getpid()} {rank.pid}")
time.sleep(600)
"""


def test_the_guard_leaves_no_process_behind_when_its_actor_dies(tmp_path):
    """Actor killed -9: the guard stops the daemon and its own-session rank by PID."""
    pids = tmp_path / "pids"
    actor = subprocess.Popen([sys.executable, "-c", ACTOR, sys.executable, "-m", "launch.ray_job",
                              "guard", "--", sys.executable, "-c", TORCHRUN, str(pids)],
                             cwd=REPO, env=child_env(), start_new_session=True)
    try:
        wait_until(lambda: pids.is_file() and len(pids.read_text().split()) == 2, 60, 0.1,
                   "the stand-in daemon and its rank")
        daemon, rank = (psutil.Process(int(p)) for p in pids.read_text().split())
        wait_until(lambda: rank.pid in [p.pid for p in psutil.Process(actor.pid).children(True)],
                   10, 0.1, "the rank under the guard")
        # the guard records the descendants every 0.5 s: the rank has lived through two polls
        wait_until(lambda: time.time() - rank.create_time() > 1.0, 10, 0.1, "two polls")
        actor.kill()
        actor.wait(10)
        gone, alive = psutil.wait_procs([daemon, rank], timeout=30)
        assert not alive, f"left behind: {alive}"
    finally:
        _kill_tree(actor.pid)
        for p in pids.read_text().split() if pids.is_file() else ():
            _kill_tree(int(p))


DAEMON_UP = "import time; print('daemon-up', flush=True); time.sleep(600)"


def test_rays_messages_about_the_cluster_stay_out_of_a_daemons_output(tmp_path, capfd,
                                                                      monkeypatch):
    """Ray's cluster messages stay out of a daemon's log (the proxy relays its lines only)."""
    Cluster = _need_ray()
    import ray
    from ray.util import placement_group

    temp = tempfile.mkdtemp(prefix="al-ray-")
    # Cluster writes the head's address to $RAY_TMPDIR/ray/ray_current_cluster, whatever temp_dir
    # says (/tmp/ray by default, which may not exist yet): this test's own
    monkeypatch.setenv("RAY_TMPDIR", temp)
    os.mkdir(os.path.join(temp, "ray"))
    c = Cluster(initialize_head=True,
                head_node_args={"num_cpus": 1, "resources": {"n0": 1}, "include_dashboard": False,
                                "_system_config": SYSTEM, "temp_dir": temp})
    proxy, out = None, tmp_path / "proxy.out"
    try:
        worker = c.add_node(num_cpus=1, temp_dir=temp)
        c.wait_for_nodes()
        ray.init(address=c.address, namespace="areal-like")  # the proxies'
        ray.get(placement_group([{"CPU": 1, "n0": 1}], name="noise").ready(), timeout=60)
        (tmp_path / "ray").mkdir()
        with out.open("w") as sink:
            proxy = subprocess.Popen(
                [sys.executable, "-m", "launch.ray_job", "exec", "--pg", "noise", "--bundle", "0",
                 "--cpus", "1", "--gpus", "0", "--name", "d", "--run-dir", str(tmp_path), "--",
                 sys.executable, "-c", DAEMON_UP],
                cwd=REPO, env=child_env({"RAY_ADDRESS": c.address}), stdout=sink,
                stderr=subprocess.STDOUT)
        wait_until(lambda: "daemon-up" in out.read_text().split(), 60, 0.2, "its first line")
        c.remove_node(worker, allow_graceful=False)
        seen: list[str] = []
        wait_until(lambda: seen.append(capfd.readouterr().out) or "(raylet)" in "".join(seen),
                   60, 0.2, "Ray's message, in this driver, that the worker node is dead")
        with contextlib.suppress(AssertionError):  # the proxy hears it at the same time
            wait_until(lambda: "(raylet)" in out.read_text(), 10, 0.2, "")
        assert "(raylet)" not in out.read_text(), out.read_text()
        assert "daemon-up" in out.read_text().split()
    finally:
        if proxy is not None:
            _kill_tree(proxy.pid)
        ray.shutdown()
        c.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def _kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.Error:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=30)


def _placed(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / "ray" / f"{name}.json").read_text())


def _ask(run_dir: Path, request):
    """The buffer's answer to ``request``, over CURVE with the trainer's keys."""
    from areal_like.net import security
    from areal_like.net.dealer import Client

    ports = json.loads((run_dir / "ports.json").read_text())
    client = Client(ports["buffer_address"], keys=security.load(run_dir / "keys", "trainer"),
                    timeout_s=10)
    try:
        return client.request(request)
    finally:
        client.close()


def _books(run_dir: Path) -> dict:
    return _ask(run_dir, P.StatsRequest()).values


def _balance(s: dict) -> bool:
    dropped = sum(v for k, v in s.items() if k.startswith("groups_dropped"))
    return s.get("groups_accepted", 0) == (s.get("groups_consumed", 0) + dropped + s["stored"]
                                           + s.get("in_transit", 0))


def _job_processes(run_dir: Path) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and any(
                str(run_dir) in c for c in p.info["cmdline"] or []):
            out.append(p)
    return out


def _steps(run_dir: Path) -> int:
    return len(step_records(run_dir))


def _curve(run_dir: Path, every: int = 50) -> list:
    """The run's reward by ``every`` steps, with the members each window's syncs reached: what a
    failed learning check shows."""
    recs, out = step_records(run_dir), []
    for i in range(0, len(recs), every):
        window = recs[i:i + every]
        synced = {m for r in window for m in (r.get("weight_sync") or {}).get("done", [])}
        reward = sum(r["reward_mean"] for r in window) / len(window)
        out.append((window[0]["step"], round(reward, 3), sorted(synced)))
    return out


def _roster(run_dir: Path) -> set[str]:
    return {m.server_id for m in _ask(run_dir, P.RosterRequest()).members}


def _url(run_dir: Path, name: str) -> str:
    ports = json.loads((run_dir / "ports.json").read_text())
    return next(d["metrics_url"] for d in ports["daemons"] if d["name"] == name)


def _scale_rollout_up_and_down(run_dir: Path) -> None:
    """rollout=3 adds a server in its own actor; rollout=2 removes it; every group accounted."""
    from areal_like.net.metrics import scrape

    # a new actor's process imports torch and starts its engine: minutes on a loaded machine
    up = _cli("scale", str(run_dir), "rollout=3", timeout=SCALE_TIMEOUT_S)
    assert up.returncode == 0 and "rollout: 2 -> 3" in up.stdout, up.stdout + up.stderr
    third = _placed(run_dir, "rollout-2")
    ports = json.loads((run_dir / "ports.json").read_text())
    assert ports["pools"] == {"rollout": 3, "trainer": 1}, ports
    assert f"http://{third['host']}:" in _url(run_dir, "rollout-2")
    status = _cli("status", str(run_dir))
    assert any(ln.split()[:2] == ["rollout-2", "up"] for ln in status.stdout.splitlines()), \
        status.stdout
    wait_until(lambda: scrape(_url(run_dir, "rollout-2")).get(
        "areal_rollout_groups_acked_total", 0) > 0 and "rollout-2" in _roster(run_dir), 120, 0.5,
        "groups from rollout-2 acknowledged")

    down = _cli("scale", str(run_dir), "rollout=2", timeout=SCALE_TIMEOUT_S)
    assert down.returncode == 0 and "rollout: 3 -> 2" in down.stdout, down.stdout + down.stderr
    assert _roster(run_dir) == {"rollout-0", "rollout-1"}
    assert "left the buffer's roster" in (run_dir / "logs" / "rollout-2.log").read_text()
    wait_until(lambda: not psutil.pid_exists(third["pid"])
               or psutil.Process(third["pid"]).status() == psutil.STATUS_ZOMBIE, 30, 0.2,
               "rollout-2's guard gone with its actor")
    assert not (run_dir / "ray" / "rollout-2.json").exists()
    assert _balance(_books(run_dir))


@pytest.mark.timeout(900)
def test_a_ray_job_learns_scales_survives_a_lost_node_and_stops(cluster, tmp_path):
    run_dir = tmp_path / "run"
    env = cluster.client_env(RAY_ADDRESS=cluster.address)
    job = subprocess.Popen([sys.executable, "-m", "launch.cli", "run", "-q", *LEARN,
                            f"model.path={warm_model(WARM_CACHE)}", f"run_dir={run_dir}"],
                           cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=open(tmp_path / "job.err", "w"), text=True,
                           start_new_session=True)
    try:
        wait_until(lambda: _steps(run_dir) >= 2 or job.poll() is not None, 300, 1.0,
                   "two trained steps")
        assert job.poll() is None, (tmp_path / "job.err").read_text()[-3000:]
        status = _cli("status", str(run_dir))
        assert status.returncode == 0, status.stdout + status.stderr
        names = ("buffer", "rollout-0", "rollout-1", "trainer")
        states = [ln.split()[:2] for ln in status.stdout.splitlines()[:4]]
        assert states == [[n, "up"] for n in names], status.stdout
        targets = json.loads((run_dir / "prometheus_targets.json").read_text())
        assert sorted(t["labels"]["daemon"] for t in targets) == sorted(names), targets
        top = _cli("top", str(run_dir), "--once", "--interval", "0.5")
        assert top.returncode == 0 and "rollout-1" in top.stdout, top.stdout + top.stderr

        _scale_rollout_up_and_down(run_dir)

        placed = {n: _placed(run_dir, n) for n in names}
        # three bundles on three nodes: the two servers' nodes run nothing else
        assert len({p["node_id"] for p in placed.values()}) == 3, placed

        # ---- a node that runs only a rollout server is lost: its raylet and every process on it
        victim, node = next((n, w) for n in ("rollout-1", "rollout-0") for w in cluster.nodes[1:]
                            if placed[n]["pid"] in [p.pid for p in
                                                    psutil.Process(w.pid).children(True)])
        before, at_kill = _books(run_dir), _steps(run_dir)
        _kill_tree(node.pid)
        moved = wait_until(lambda: (p := _placed(run_dir, victim))["node_id"]
                           != placed[victim]["node_id"] and p, 180, 1.0,
                           f"{victim} placed again on a live node")
        assert moved["node_id"] in {placed[n]["node_id"] for n in placed}, moved
        log = run_dir / "logs" / f"{victim}.log"
        wait_until(lambda: log.read_text().count("rollout: started") >= 2, 180, 1.0,
                   f"{victim} started on its new node")
        assert "its actor or node is lost" in log.read_text(), log.read_text()[-3000:]
        # one restart: the restarted actor waits until Ray placed the bundle anew (launch/RAY.md);
        # one more where Ray placed it on the lost node before its health checks ran out (8 s)
        assert log.read_text().count(LOG_START) in (2, 3), log.read_text()[-3000:]
        wait_until(lambda: _steps(run_dir) >= at_kill + 3, 240, 1.0, "steps after the loss")
        status = _cli("status", str(run_dir))
        assert status.returncode == 0, status.stdout + status.stderr
        after = _books(run_dir)
        assert _balance(before) and _balance(after), (before, after)
        assert after["groups_accepted"] >= before["groups_accepted"]
        ports = json.loads((run_dir / "ports.json").read_text())
        assert [d["name"] for d in ports["daemons"]] == ["buffer", "rollout-0", "rollout-1",
                                                         "trainer"]

        # ---- stop as Ctrl-C does
        daemons = [_placed(run_dir, n)["pid"] for n in placed]
        stop = _cli("stop", str(run_dir))
        assert stop.returncode == 0 and "stopped" in stop.stdout, stop.stdout + stop.stderr
        out, _ = job.communicate(timeout=60)
        summary = json.loads(out.strip().splitlines()[-1])
        assert job.returncode == 128 + signal.SIGTERM, job.returncode
        assert summary["end"] == "stopped" and summary["steps"] >= at_kill + 3, summary
        assert summary["reward_last"] - summary["reward_first"] >= 0.3, \
            f"reward by 50 steps: {_curve(run_dir)}; summary: {json.dumps(summary)}"
        assert not [p for p in daemons if psutil.pid_exists(p)
                    and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        # nothing of the job is left: proxies, guards, daemons, torchrun's rank (own session)
        wait_until(lambda: not _job_processes(run_dir), 60, 0.5, "every process of the job to exit")
        # the trainer stopped as on Ctrl-C: with its done record
        assert trainer_done(run_dir)
    finally:
        if job.poll() is None:
            _kill_tree(job.pid)
