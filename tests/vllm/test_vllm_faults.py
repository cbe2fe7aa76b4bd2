"""Faults with the real vLLM: ``kill -9`` of the rollout server (vLLM goes too, its whole process
group, with its port, /dev/shm files and TMPDIR), and ``kill -9`` of vLLM in a running job on
``topology=cpu_vllm`` (its rollout server notices, the launcher starts it again with a new
engine, and the job goes on to its last step)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from vllm_kit import MODEL

from rollout_server.engine_reaper import group_members, shm_files

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))
from system_harness import RunningSystem  # noqa: E402

GONE_DEADLINE_S = 60.0  # SIGKILL is immediate; the slack is for a loaded 2-core machine
STANDIN = r"""
import sys
from vllm_kit import model_config, cpu_engine
from rollout_server.launch_vllm import VLLMProcess
proc = VLLMProcess(model_config(sys.argv[1]), cpu_engine(), log_path=sys.argv[2]).start()
print("READY", proc.proc.pid, proc.port, flush=True)
sys.stdin.read()  # until the test kills us
"""


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not a listener
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _wait(cond, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := cond():
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s:.0f}s: {what}")


def test_killing_the_rollout_server_takes_vllm_its_port_and_its_files(model_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)])}
    server = subprocess.Popen(
        [sys.executable, "-c", STANDIN, str(model_dir), str(tmp_path / "vllm.log")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        line = server.stdout.readline()
        assert line.startswith("READY"), (
            f"the stand-in rollout server printed {line!r} (exit {server.poll()})")
        pgid, port = int(line.split()[1]), int(line.split()[2])
        members = group_members(pgid)
        assert len(members) >= 2 and not _port_free(port)  # the API server and its engine core
        files = shm_files(pgid)
        environ = Path(f"/proc/{pgid}/environ").read_bytes().split(b"\0")
        tmpdir = next(e[len(b"TMPDIR="):].decode() for e in environ if e.startswith(b"TMPDIR="))
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        _wait(lambda: not group_members(pgid), GONE_DEADLINE_S, f"vLLM's group {pgid} gone")
        _wait(lambda: _port_free(port), GONE_DEADLINE_S, f"port {port} free")
        _wait(lambda: not any(os.path.exists(f) for f in [*files, tmpdir]), GONE_DEADLINE_S,
              f"{sorted(files)} and {tmpdir} removed")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def _engine_of(rs: RunningSystem, name: str) -> psutil.Process | None:
    """The live vLLM API server process of rollout server ``name``."""
    try:
        kids = psutil.Process(rs.pid(name)).children()
    except psutil.Error:
        return None
    for kid in kids:
        try:
            if "vllm.entrypoints.launchers" in " ".join(kid.cmdline()):
                return kid
        except psutil.Error:
            continue
    return None


@pytest.mark.timeout(1800)  # a whole job with two vLLM start-ups (1-3 minutes each here)
def test_a_killed_vllm_is_noticed_relaunched_and_the_job_goes_on(model_dir, tmp_path):
    from areal_like.settings.config import load_config

    # the tier's tiny model as it is built (no warm start: what it learns does not matter here)
    cfg = load_config(["experiment=quickstart", "topology=cpu_vllm", "trainer.steps=12",
                       "trainer.checkpoint_every=4", "launch.restarts=2",
                       "launch.health_timeout_s=600", "eval.at_end=false",
                       f"model.max_position_embeddings={MODEL['max_position_embeddings']}",
                       f"run_dir={tmp_path / 'run'}", f"model.path={model_dir}",
                       "warm_start.steps=0"])
    with RunningSystem(cfg) as rs:
        rs.wait_step(3, timeout_s=600)
        first = _wait(lambda: _engine_of(rs, "rollout-0"), 60, "the first vLLM process")
        first.send_signal(signal.SIGKILL)
        second = rs.wait_for(
            lambda: (e := _engine_of(rs, "rollout-0")) and e.pid != first.pid and e,
            600, "a new vLLM under a new rollout server")
        assert rs.sup.proc("rollout-0").restarts == 1
        log = (rs.run_dir / "logs" / "rollout-0.log").read_text()
        assert f"its vLLM engine (pid {first.pid}) exited with code -9" in log
        rs.wait_for(rs.completed.is_set, 900, "the job's last step")
        assert rs.steps()[-1]["step"] == 12
        assert rs.sup.proc("rollout-0").restarts == 1
        log = (rs.run_dir / "logs" / "rollout-0.log").read_text()
        assert re.search(rf"vLLM healthy at \S+ \(pid {second.pid}\)", log), log
