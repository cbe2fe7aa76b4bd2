"""Faults with the real SGLang: ``kill -9`` of the rollout server (SGLang goes too, with its port,
/dev/shm files and TMPDIR), and ``kill -9`` of SGLang in a running job (its rollout server
notices, the launcher starts it again with a new engine, and the job goes on).

Mutations checked (each made once, each failed its test): ``SGLangProcess.start`` without the
reaper (the /dev/shm files stayed); ``engine_reaper.shm_files`` without the semaphores its group
maps under an unlinked name (SGLang's ``sem.mp-*`` was not among the files the reaper is told,
and stayed); ``raise_if_engine_died`` returning at once (the rollout server
went on failing episodes and left on "5 episodes failed in a row" instead).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from rollout_server.engine_reaper import group_members, shm_files

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))
from system_harness import RunningSystem  # noqa: E402

# where system_harness.warm_model keeps the quickstart's warm start
WARM_CACHE = Path(tempfile.gettempdir()) / "areal-like-test-warmstart" / "warm" / "warmstart"
GONE_DEADLINE_S = 60.0  # SIGKILL is immediate; the slack is for a loaded 2-core machine
STANDIN = r"""
import sys
from sglang_kit import model_config, cpu_engine
from rollout_server.launch_sglang import SGLangProcess
proc = SGLangProcess(model_config(sys.argv[1]), cpu_engine(), log_path=sys.argv[2]).start()
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


def _mapped_semaphores(pgid: int) -> set[str]:
    """The /dev/shm/sem.* files the processes of group ``pgid`` map, by inode: a semaphore's creator
    maps it under glibc's temporary name, unlinked since (the test's own reading of /proc)."""
    inodes = set()
    for pid in group_members(pgid):
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            cols = line.split(None, 5)
            if len(cols) == 6 and cols[5].startswith("/dev/shm/sem."):
                inodes.add(int(cols[4]))
    return {e.path for e in os.scandir("/dev/shm")
            if e.name.startswith("sem.") and e.inode() in inodes}


def test_killing_the_rollout_server_takes_sglang_its_port_and_its_files(model_dir, tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)]),
        "OMP_NUM_THREADS": "1",
    }
    server = subprocess.Popen(
        [sys.executable, "-c", STANDIN, str(model_dir), str(tmp_path / "sglang.log")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    try:
        line = server.stdout.readline()
        assert line.startswith("READY"), (
            f"the stand-in rollout server printed {line!r} (exit {server.poll()})"
        )
        pgid, port = int(line.split()[1]), int(line.split()[2])
        files = shm_files(pgid)
        assert any("sglang_loads_" in f for f in files), files  # what SGLang leaves even on SIGTERM
        sems = _mapped_semaphores(pgid)  # tqdm's lock in the scheduler: left even on SIGTERM
        assert any("/sem.mp-" in f for f in sems) and sems <= files, (sems, files)
        assert group_members(pgid) and not _port_free(port)
        environ = Path(f"/proc/{pgid}/environ").read_bytes().split(b"\0")
        tmpdir = next(e[len(b"TMPDIR="):].decode() for e in environ if e.startswith(b"TMPDIR="))
        assert os.listdir(tmpdir), tmpdir  # its IPC sockets, in a directory of its own
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        _wait(lambda: not group_members(pgid), GONE_DEADLINE_S, f"SGLang's group {pgid} gone")
        _wait(lambda: _port_free(port), GONE_DEADLINE_S, f"port {port} free")
        _wait(
            lambda: not any(os.path.exists(f) for f in [*files, tmpdir]),
            GONE_DEADLINE_S,
            f"{sorted(files)} and {tmpdir} removed",
        )
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def _engine_of(rs: RunningSystem, name: str) -> psutil.Process | None:
    """The live SGLang main process of rollout server ``name`` (a killed one is a zombie
    until reaped)."""
    try:
        kids = psutil.Process(rs.pid(name)).children()
    except psutil.Error:
        return None
    for kid in kids:
        try:
            if "sglang.launch_server" in " ".join(kid.cmdline()):
                return kid
        except psutil.Error:
            continue
    return None


@pytest.mark.timeout(
    1800
)  # a whole job with two SGLang start-ups (up to ~2 min each on a loaded machine)
def test_a_killed_sglang_is_noticed_relaunched_and_the_job_goes_on(tmp_path):
    from areal_like.settings.config import load_config
    from launch.warmstart import ensure_warm_start

    over = [
        "experiment=quickstart",
        "topology=cpu_sglang",
        "trainer.steps=30",
        "trainer.checkpoint_every=10",
        "launch.restarts=2",
        "launch.health_timeout_s=300",
        "eval.at_end=false",
    ]
    # the quickstart's warm start, from the main tier's cache (the same key: not trained again)
    warm = ensure_warm_start(
        load_config([*over, f"run_dir={tmp_path / 'warm' / 'run'}",
                     f"warm_start.cache_dir={WARM_CACHE}"]), log=lambda m: None
    )
    cfg = load_config(
        [
            *over,
            f"run_dir={tmp_path / 'run'}",
            f"model.path={warm.model.path}",
            "warm_start.steps=0",
        ]
    )
    with RunningSystem(cfg) as rs:
        rs.wait_step(5, timeout_s=300)
        first = _wait(lambda: _engine_of(rs, "rollout-0"), 60, "the first SGLang process")
        files = shm_files(first.pid)
        first.send_signal(signal.SIGKILL)
        second = rs.wait_for(
            lambda: (e := _engine_of(rs, "rollout-0")) and e.pid != first.pid and e,
            300,
            "a new SGLang under a new rollout server",
        )
        assert rs.sup.proc("rollout-0").restarts == 1
        log = (rs.run_dir / "logs" / "rollout-0.log").read_text()
        assert f"its SGLang engine (pid {first.pid}) exited with code -9" in log
        _wait(
            lambda: not any(os.path.exists(f) for f in files),
            GONE_DEADLINE_S,
            f"{sorted(files)} removed",
        )
        rs.wait_for(rs.completed.is_set, 600, "the job's last step")
        assert rs.steps()[-1]["step"] == 30
        # the relaunched engine came up and served to the end: no further restart (rollout servers
        # leave on the trainer's last step, so the engine itself may already be gone here). The
        # plan published while it started is not its own: the buffer left it out at its fresh
        # registration (taking that plan up blocked SGLang's scheduler in a group join
        # nobody formed any more, and the post-sync probe restarted the server a second time)
        assert rs.sup.proc("rollout-0").restarts == 1
        log = (rs.run_dir / "logs" / "rollout-0.log").read_text()
        assert re.search(rf"SGLang healthy at \S+ \(pid {second.pid}\)", log), log
