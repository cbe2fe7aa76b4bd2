"""``areal-like scale``'s one-line refusals (exit 2, asking nothing) and the Scaler's refusals."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from areal_like.settings.config import load_config, to_yaml
from launch.cli import main
from launch.job import plan_job
from launch.local import Supervisor
from launch.rundir import lock_run_dir
from launch.scale import REQUEST_FILE, STATE_FILE, Scaler


def _run_dir(tmp_path: Path, *overrides: str) -> Path:
    """A run directory with the laid-out config.yaml of a job (no job running in it)."""
    cfg, _ = plan_job(load_config([f"run_dir={tmp_path / 'run'}", "launch.num_rollout_servers=1",
                                   "launch.trainer_ranks=1", *overrides]))
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return run_dir


def _refused(capsys, run_dir: Path, *args: str) -> str:
    assert main(["scale", str(run_dir), *args]) == 2
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    assert not (run_dir / REQUEST_FILE).exists()
    return lines[0]


SMALL = ["buffer.groups_per_step=16", "rollout.max_concurrent_groups=8"]
RAY_JOB = ["launch.cluster=ray", "launch.nodes=3", "launch.train_nodes=1",
           "buffer.address=tcp://10.0.0.1:0", "buffer.pub_address=tcp://10.0.0.1:0",
           "trainer.weight_sync.master_addr=10.0.0.1",
           "launch.num_rollout_servers=1", "buffer.groups_per_step=4"]


@pytest.mark.parametrize("job,args,says", [
    (SMALL, ["workers=2"], "unknown pool 'workers'"),
    (SMALL, ["rollout=two"], "rollout='two' is not a whole number"),
    (SMALL, ["trainer=1.5"], "trainer='1.5' is not a whole number"),
    (SMALL, ["rollout"], "give one pool size"),
    (SMALL, ["rollout=2", "trainer=2"], "give one pool size"),
    (SMALL, ["rollout=0"], "rollout=0: a running job needs at least one rollout server"),
    (SMALL, ["trainer=0"], "trainer=0: a running job needs at least one trainer rank"),
    (SMALL, ["rollout=-1"], "rollout=-1: a running job needs at least one rollout server"),
    # 1 x 8 groups at once < 16 groups a batch
    (SMALL, ["rollout=1"], "fewer than one batch needs (buffer.groups_per_step=16); at least 2"),
    # twice the servers it started with, at least 8 (buffer/facts.py max_servers)
    (SMALL, ["rollout=9"], "the job's buffer admits at most 8 rollout servers"),
    # pools this job cannot resize: the placement group's bundle on node 0 holds the ranks the
    # job started with
    ([*RAY_JOB, "launch.trainer_ranks=1"], ["trainer=2"],
     "start the job with launch.trainer_ranks=2"),
    ([*RAY_JOB, "launch.trainer_ranks=1", "launch.nodes=4", "launch.train_nodes=2"], ["trainer=1"],
     "launch.train_nodes=2 nodes is not resized"),
    (["rollout.engine.kind=url", "rollout.engine.url=http://h:1"], ["rollout=2"],
     "rollout.engine.kind=url"),  # an engine by URL serves one rollout server
])
def test_bad_requests_are_refused_in_one_line(tmp_path, capsys, job, args, says):
    assert says in _refused(capsys, _run_dir(tmp_path, *job), *args)


def test_a_job_that_is_not_running_or_not_run_s_is_refused(tmp_path, capsys):
    assert "is not a run directory (no config.yaml)" in _refused(capsys, tmp_path, "rollout=2")
    run_dir = _run_dir(tmp_path)
    assert f"no job is running in {run_dir}" in _refused(capsys, run_dir, "rollout=2")
    lock = lock_run_dir(run_dir)  # this process holds the job lock: a job started by hand
    try:
        (run_dir / "ports.json").write_text(json.dumps({"daemons": []}))
        assert "was not started by `areal-like run`" in _refused(capsys, run_dir, "rollout=2")
    finally:
        os.close(lock)


def _scaler(tmp_path: Path, gpus: int) -> tuple[Scaler, Path]:
    cfg, topo = plan_job(load_config([f"run_dir={tmp_path / 'run'}", "topology=gpu_embedded",
                                      f"launch.gpus_per_node={gpus}"]))
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / REQUEST_FILE).write_text(json.dumps({"id": "old", "pool": "rollout", "size": 3}))
    return Scaler(cfg, topo, run_dir, specs=lambda *_: [], publish=lambda *_: None), run_dir


def _ask(scaler: Scaler, run_dir: Path, pool: str, size: int) -> dict:
    (run_dir / REQUEST_FILE).write_text(json.dumps({"id": f"{pool}{size}", "pool": pool,
                                                    "size": size}))
    scaler(Supervisor([], run_dir, echo=lambda _: None))
    return json.loads((run_dir / STATE_FILE).read_text())


def test_the_supervisor_refuses_a_layout_that_does_not_fit_the_gpus(tmp_path):
    scaler, run_dir = _scaler(tmp_path, gpus=4)  # trainer on GPU 0, rollout-0 on GPU 1
    scaler(Supervisor([], run_dir, echo=lambda _: None))
    assert not (run_dir / STATE_FILE).exists()  # an earlier run's request is not applied
    moved = _ask(scaler, run_dir, "trainer", 2)
    assert moved["state"] == "refused"
    assert "would move rollout-0 from GPUs (1,) to (2,)" in moved["message"]
    full = _ask(scaler, run_dir, "rollout", 4)
    assert full["state"] == "refused" and "needs 5 GPUs per node" in full["message"]
    assert scaler.sizes == {"rollout": 1, "trainer": 1}


def test_a_request_replaced_before_the_job_read_it_says_so(tmp_path, capsys):
    run_dir = _run_dir(tmp_path)
    lock = lock_run_dir(run_dir)  # this process is the job's `areal-like run`
    (run_dir / "ports.json").write_text(json.dumps({"daemons": [], "supervisor_pid": os.getpid()}))
    replaced = threading.Event()

    def second_command():  # writes its request over the first's, as `request` does
        while not (run_dir / REQUEST_FILE).exists():
            replaced.wait(0.01)
        (run_dir / REQUEST_FILE).write_text(json.dumps({"id": "b", "pool": "rollout", "size": 3}))
        replaced.set()

    other = threading.Thread(target=second_command, daemon=True)
    other.start()
    try:
        code = main(["scale", "--timeout", "30", str(run_dir), "rollout=2"])
    finally:
        os.close(lock)
        other.join(10)
    err = capsys.readouterr().err
    assert code == 1 and replaced.is_set()
    assert err.startswith("error: another request (rollout=3) replaced rollout=2 before the job "
                          "reported it done"), err


@pytest.mark.parametrize("timeout", ["0", "-1", "nan"])
def test_a_timeout_that_is_not_seconds_is_refused_before_the_job_is_asked(tmp_path, capsys,
                                                                          timeout):
    run_dir = _run_dir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(["scale", "--timeout", timeout, str(run_dir), "rollout=2"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --timeout: {timeout} is not a number of seconds > 0" in err
    assert not (run_dir / REQUEST_FILE).exists()


def test_a_ray_job_grows_its_rollout_pool_outside_the_placement_group(tmp_path):
    """Extra servers get actors of their own; the highest leave first."""
    from launch.ray_job import RayCluster

    cfg, topo = plan_job(load_config([f"run_dir={tmp_path / 'run'}", *RAY_JOB,
                                      "launch.trainer_ranks=2", "rollout.metrics_port=9101"]))
    Path(cfg.run_dir).mkdir(parents=True)
    ray = RayCluster("pg", "10.0.0.1:6379", ["10.0.0.1", "10.0.0.2", "10.0.0.3"], shared=False)
    ray.specs(cfg, topo, tmp_path / "config.yaml")
    servers = {s.name: s for s in topo.slots if s.kind == "rollout"}
    assert {n: s.node for n, s in servers.items()} == {"rollout-0": 1, "rollout-1": 2}

    _, up = ray.scale_layout(cfg, topo, "rollout", 4)
    assert [s.name for s in up.slots] == ["buffer", "rollout-0", "rollout-1", "rollout-2",
                                          "rollout-3", "trainer"]
    new = up.slot("rollout-3")
    assert (new.node, new.metrics_port) == (3 + 3, 9101 + 3)
    assert new.overrides == ("rollout.server_id=rollout-3", "rollout.metrics_port=9104")
    specs = {s.name: s for s in ray.specs(cfg, up, tmp_path / "config.yaml")}
    assert specs["rollout-3"].argv[specs["rollout-3"].argv.index("--bundle") + 1] == "-1"
    assert specs["rollout-1"].argv[specs["rollout-1"].argv.index("--bundle") + 1] == "2"

    _, down = ray.scale_layout(cfg, up, "rollout", 1)
    assert [s.name for s in down.slots] == ["buffer", "rollout-0", "trainer"]
    _, back = ray.scale_layout(cfg, down, "rollout", 2)
    assert back.slot("rollout-1") == servers["rollout-1"]  # in its bundle again

    one, same = ray.scale_layout(cfg, topo, "trainer", 1)
    assert one.launch.trainer_ranks == 1 and same == topo
    argv = {s.name: s for s in ray.specs(one, same, tmp_path / "config.yaml")}["trainer"].argv
    assert argv[argv.index("--nproc-per-node") + 1] == "1"
