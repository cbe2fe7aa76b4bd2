"""``areal-like run launch.cluster=ray`` on a real local Ray cluster of three nodes
(``ray.cluster_utils.Cluster``: a head and two worker raylets, each with its own CPUs and a resource
``n<k>`` of its own; node failure seen after ~3 s).

One job (the quickstart from its cached warm start: buffer + trainer on layout node 0, one rollout
server on each of nodes 1 and 2, CPU, embedded engines) trains steps; ``status``, ``top`` and
ports.json see every daemon at its Ray node; ``areal-like scale`` grows the rollout pool to three
servers (the third in an actor of its own) and back to two, every acknowledged group accounted
for; the raylet of a node running only a rollout server is killed by PID with every process
under it: Ray places that server's bundle again on a live node, the supervisor starts it there,
the trainer goes on, and the buffer's books balance (every acknowledged group consumed, dropped or
stored: none lost); ``areal-like stop`` stops the job as Ctrl-C does; the reward rose by >= 0.3.

Bad input, each one ``error:`` line and exit 2 before any daemon starts: Ray not importable, no
cluster at the address, a layout with more GPUs or CPUs than the cluster has, a run directory a
node does not see (a one-node cluster whose raylet runs in a mount namespace of its own, where a
tmpfs hides the directory).

Needs Ray (``pip install -e '.[ray]'``, as ``.ci/run`` does): skipped without it, except in CI
(CI=true), where that is a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
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
from launch.local import LOG_START
from launch.records import step_records
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
# Ray marks a node dead after this many missed 1 s health checks (default 5 x 3 s)
SYSTEM = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


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


@pytest.fixture(scope="module")
def cluster() -> Iterator:
    Cluster = _need_ray()
    temp = tempfile.mkdtemp(prefix="al-ray-")  # Ray's sessions and logs (short: its sockets)
    c = Cluster(initialize_head=True,
                head_node_args={"num_cpus": 3, "resources": {"n0": 1}, "include_dashboard": False,
                                "_system_config": SYSTEM, "temp_dir": temp})
    try:
        for k in (1, 2):
            c.add_node(num_cpus=3, resources={f"n{k}": 1}, temp_dir=temp)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


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


def test_ray_not_installed_is_one_error_line(tmp_path):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "ray.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    env = child_env({"PYTHONPATH": f"{shadow}{os.pathsep}{REPO}"})
    _refused(_cli("run", *JOB, f"run_dir={tmp_path / 'run'}", env=env), "needs Ray",
             ".[ray]")
    assert not (tmp_path / "run").exists()


def test_no_cluster_at_the_address_is_one_error_line(tmp_path):
    _need_ray()
    env = child_env({"RAY_ADDRESS": f"127.0.0.1:{free_port()}"})
    _refused(_cli("run", *JOB, f"run_dir={tmp_path / 'run'}", env=env), "no Ray cluster at")
    assert not (tmp_path / "run").exists()


def test_a_dashboard_address_is_one_error_line(tmp_path):
    """RAY_ADDRESS as the jobs CLI wants it (http://HEAD:8265) names the GCS address instead."""
    _need_ray()
    env = child_env({"RAY_ADDRESS": f"http://127.0.0.1:{free_port()}"})
    _refused(_cli("run", *JOB, f"run_dir={tmp_path / 'run'}", env=env), "dashboard address",
             "HEAD:6379", "ray job submit")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("more, words", [
    (["trainer.device=cuda", "rollout.engine.device=cuda", "launch.gpus_per_node=1"],
     ("node 0 of the layout needs", "1 GPU", "no node of the Ray cluster")),
    (["launch.ray_cpus=2"], ("node 0 of the layout needs 4 CPU", "the largest: 3 CPU")),
    (["launch.nodes=10"], ("the layout needs 11 CPU", "has 9 CPU")),
])
def test_a_layout_larger_than_the_cluster_is_one_error_line(cluster, tmp_path, more, words):
    env = child_env({"RAY_ADDRESS": cluster.address})
    keys = {a.split("=")[0] for a in more}
    job = [a for a in JOB if a.split("=")[0] not in keys]
    _refused(_cli("run", *job, f"run_dir={tmp_path / 'run'}", *more, env=env), *words)
    assert not (tmp_path / "run").exists()


def test_a_run_dir_a_node_does_not_see_is_one_error_line(tmp_path):
    _need_ray()
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a mount namespace of its own for the raylet needs root and unshare")
    hidden = tmp_path / "hidden"  # a tmpfs over it in the raylet's mount namespace
    hidden.mkdir()
    # above the ports Ray keeps for its workers (10002-19999), which it refuses for the GCS
    port = next(p for p in iter(free_port, 0) if p >= 20000)
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    temp = tempfile.mkdtemp(prefix="al-ray-")
    script = (f"mount -t tmpfs tmpfs {hidden} && exec {ray} start --head --port={port} "
              f"--temp-dir={temp} --num-cpus=4 --include-dashboard=false --disable-usage-stats "
              "--block")
    log = tmp_path / "ray-head.log"
    head = subprocess.Popen(["unshare", "--mount", "sh", "-c", script], env=child_env(),
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        env = child_env({"RAY_ADDRESS": f"127.0.0.1:{port}"})
        wait_until(lambda: _up(port) or head.poll() is not None, 180, 0.5,
                   "the namespaced Ray head")
        assert head.poll() is None, log.read_text()[-3000:]
        result = _cli("run", *[a for a in JOB if not a.startswith("launch.nodes")],
                      f"run_dir={hidden / 'run'}", env=env)
        _refused(result, "is not on storage every node sees", "FileNotFoundError")
    finally:
        _kill_tree(head.pid)
        shutil.rmtree(temp, ignore_errors=True)


ACTOR = """import functools, os, subprocess, sys, time
from areal_like.daemon import die_with_parent
subprocess.Popen(sys.argv[1:], preexec_fn=functools.partial(die_with_parent, os.getpid()))
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
    """The actor's child (``python -m launch.ray_job guard``) outlives nothing: when the actor is
    killed (-9), the kernel stops the guard, which stops the daemon and then, by PID, the rank
    the daemon put in a session of its own."""
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


def test_rays_messages_about_the_cluster_stay_out_of_a_daemons_output(tmp_path, capfd):
    """Ray prints the cluster's error messages (a node marked dead, with its raylet's state dump) to
    the stdout of every driver: a proxy relays only its daemon's lines, so the daemon's log holds
    none of them (the job's own driver shows them once)."""
    Cluster = _need_ray()
    import ray
    from ray.util import placement_group

    temp = tempfile.mkdtemp(prefix="al-ray-")
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


def _up(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process under it, by PID."""
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


def _books(run_dir: Path) -> dict:
    """The buffer's counters (``StatsRequest``), over CURVE with the trainer's keys."""
    from areal_like.net import security
    from areal_like.net.dealer import Client
    from areal_like.wire import protocol as P

    ports = json.loads((run_dir / "ports.json").read_text())
    client = Client(ports["buffer_address"], keys=security.load(run_dir / "keys", "trainer"),
                    timeout_s=10)
    try:
        return client.request(P.StatsRequest()).values
    finally:
        client.close()


def _balance(s: dict) -> bool:
    dropped = sum(v for k, v in s.items() if k.startswith("groups_dropped"))
    return s.get("groups_accepted", 0) == (s.get("groups_consumed", 0) + dropped + s["stored"]
                                           + s.get("in_transit", 0))


def _job_processes(run_dir: Path) -> list[psutil.Process]:
    """The live processes whose command line names ``run_dir``."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and any(
                str(run_dir) in c for c in p.info["cmdline"] or []):
            out.append(p)
    return out


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics" / "trainer.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _steps(run_dir: Path) -> int:
    return len(step_records(run_dir))


def _roster(run_dir: Path) -> set[str]:
    from areal_like.net import security
    from areal_like.net.dealer import Client
    from areal_like.wire import protocol as P

    ports = json.loads((run_dir / "ports.json").read_text())
    client = Client(ports["buffer_address"], keys=security.load(run_dir / "keys", "trainer"),
                    timeout_s=10)
    try:
        return {m.server_id for m in client.request(P.RosterRequest()).members}
    finally:
        client.close()


def _url(run_dir: Path, name: str) -> str:
    ports = json.loads((run_dir / "ports.json").read_text())
    return next(d["metrics_url"] for d in ports["daemons"] if d["name"] == name)


def _scale_rollout_up_and_down(run_dir: Path) -> None:
    """rollout=3: a third server, in an actor of its own outside the placement group, joins and
    the buffer acknowledges its groups; rollout=2: it leaves (off the roster, its actor's
    processes gone) and every group the buffer acknowledged is consumed, stored, in transit or
    dropped by rule."""
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
    """The quickstart from its warm start on three Ray nodes: status, top and the Prometheus
    targets see every daemon; the rollout pool grows and shrinks (``_scale_rollout_up_and_down``);
    a worker node is lost; ``stop`` stops it as Ctrl-C does; the reward rose by >= 0.3."""
    run_dir = tmp_path / "run"
    env = child_env({"RAY_ADDRESS": cluster.address})
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
        head = cluster.head_node.node_id
        victim = next(n for n in ("rollout-1", "rollout-0") if placed[n]["node_id"] != head)
        node = next(n for n in cluster.worker_nodes if n.node_id == placed[victim]["node_id"])
        raylet = node.all_processes["raylet"][0].process.pid
        assert placed[victim]["pid"] in [p.pid for p in psutil.Process(raylet).children(True)]
        before, at_kill = _books(run_dir), _steps(run_dir)
        _kill_tree(raylet)
        moved = wait_until(lambda: (p := _placed(run_dir, victim))["node_id"] != node.node_id
                           and p, 180, 1.0, f"{victim} placed again on a live node")
        assert moved["node_id"] in {placed[n]["node_id"] for n in placed}, moved
        log = run_dir / "logs" / f"{victim}.log"
        wait_until(lambda: log.read_text().count("rollout: started") >= 2, 180, 1.0,
                   f"{victim} started on its new node")
        assert "its actor or node is lost" in log.read_text(), log.read_text()[-3000:]
        # one restart: the restarted actor waits until Ray placed the bundle anew (launch/RAY.md)
        assert log.read_text().count(LOG_START) == 2, log.read_text()[-3000:]
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
        assert summary["reward_last"] - summary["reward_first"] >= 0.3, summary
        assert not [p for p in daemons if psutil.pid_exists(p)
                    and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        # nothing of the job is left: proxies, guards, daemons, torchrun's rank (own session)
        wait_until(lambda: not _job_processes(run_dir), 60, 0.5, "every process of the job to exit")
        done = [r for r in _records(run_dir) if r.get("event") == "done"]
        assert done, "the trainer stopped without its done record (not as on Ctrl-C)"
    finally:
        if job.poll() is None:
            _kill_tree(job.pid)
