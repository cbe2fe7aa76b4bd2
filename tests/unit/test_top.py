"""areal-like status / top as a new user meets them (job.json via write_job, or ports.json)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from areal_like.net.auth import METRICS_TOKEN_ENV
from areal_like.net.distributed import free_port
from areal_like.net.metrics import Metrics, MetricsServer
from launch.cli import main
from launch.records import summarize
from launch.rundir import lock_run_dir, write_job
from launch.top import launcher as live_launcher
from launch.top import newest_run_dir, status
from tests.conftest import run_cli


def _daemons(daemons: list[tuple[str, int, int | None]]) -> list[dict]:
    return [{"name": n, "kind": n.split("-")[0], "pid": pid,
             "metrics_url": f"http://127.0.0.1:{p}/metrics",
             "health_url": f"http://127.0.0.1:{p}/health"} for n, p, pid in daemons]


def _ports(run_dir, daemons: list[tuple[str, int, int | None]]) -> None:
    """The ports.json of a job started by hand (launch/MULTINODE.md)."""
    (run_dir / "ports.json").write_text(json.dumps({"daemons": _daemons(daemons)}))


def _job(run_dir, daemons: list[tuple[str, int, int | None]], **extra) -> None:
    """job.json of a job whose ``areal-like run`` started its daemons."""
    write_job(run_dir, state="running", daemons=_daemons(daemons), **extra)


def _states(out: str) -> dict[str, str]:
    return {ln.split()[0]: ln.split()[1] for ln in out.splitlines() if ln.strip()}


def _top(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """``areal-like top`` in a pipe (no terminal); TimeoutExpired if it does not exit."""
    return run_cli("top", *args, timeout=timeout)


def _finish(run_dir, summary: dict | None = None) -> None:
    """What ``areal-like run`` leaves when its job ends: job.json ended, with the summary."""
    write_job(run_dir, state="ended", summary=summary or {})


def _dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def test_status_says_starting_for_a_daemon_the_live_launcher_has_not_started(tmp_path, capsys):
    _job(tmp_path, [("trainer", free_port(), None)], supervisor_pid=os.getpid())
    assert status(tmp_path) == 1
    out = capsys.readouterr().out
    assert _states(out) == {"trainer": "starting"} and "not started yet" in out, out
    _job(tmp_path, [("trainer", free_port(), None)], supervisor_pid=_dead_pid())
    assert status(tmp_path) == 1
    assert _states(capsys.readouterr().out) == {"trainer": "DOWN"}


def test_status_and_top_of_a_finished_run_say_finished_without_connection_errors(tmp_path,
                                                                                  capsys):
    _job(tmp_path, [("buffer", free_port(), _dead_pid()), ("rollout-0", free_port(), None)])
    _finish(tmp_path)
    assert status(tmp_path) == 1
    out = capsys.readouterr().out
    assert _states(out) == {"job": "finished", "buffer": "finished", "rollout-0": "finished"}, out
    assert "Error" not in out and "refused" not in out, out
    for args in ([], ["--once"]):
        done = _top(str(tmp_path), "--interval", "0.2", *args)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        assert "job finished" in done.stdout and "DOWN" not in done.stdout, done.stdout
        rows = [ln.split("│")[1:3] for ln in done.stdout.splitlines() if ln.startswith("│")]
        assert [[c.strip() for c in r] for r in rows] == [["buffer", "finished"],
                                                          ["rollout-0", "finished"]], done.stdout


def _start(path, *, at: float, launcher: int, born: float | None = None) -> None:
    """job.json as areal-like run begins it at at: the launcher's PID and create_time."""
    if born is None:
        born = psutil.Process(launcher).create_time() if psutil.pid_exists(launcher) else at
    write_job(path, state="starting", started=at, supervisor_pid=launcher, supervisor_born=born)


def _run_dir(path, *, at: float, launcher: int, born: float | None = None, ports: bool = False,
             finished: bool = False):
    """A run dir as areal-like run leaves it: started at at, running (ports), ended (finished)."""
    path.mkdir(parents=True)
    _start(path, at=at, launcher=launcher, born=born)
    if ports:
        _job(path, [("buffer", free_port(), None)])
    if finished:
        _finish(path)
    return path


def test_a_run_or_resume_in_its_warm_start_is_the_newest_and_says_starting(tmp_path, capsys):
    t0 = time.time() - 600
    _run_dir(tmp_path / "runs/old", at=t0, ports=True, finished=True, launcher=_dead_pid())
    new = _run_dir(tmp_path / "runs/new", at=t0 + 300, launcher=os.getpid())
    assert newest_run_dir(tmp_path / "runs") == str(new)
    assert status(new) == 1
    out = capsys.readouterr().out
    assert _states(out) == {"job": "starting"} and "warm start" in out, out
    once = _top(str(new), "--once", "--interval", "0.1")
    assert once.returncode == 1 and "starting" in once.stdout, (once.stdout, once.stderr)
    # a job started by hand has a ports.json only: that one counts
    hand = tmp_path / "runs/hand"
    hand.mkdir()
    _ports(hand, [("buffer", free_port(), None)])
    assert newest_run_dir(tmp_path / "runs") == str(hand)
    old = tmp_path / "runs/old"
    _start(old, at=time.time(), launcher=os.getpid())  # a resume: starting, not the last end
    assert status(old) == 1
    assert _states(capsys.readouterr().out) == {"job": "starting"}


def test_a_run_whose_launcher_is_gone_is_not_starting(tmp_path, capsys):
    """A dead or reused launcher PID: DOWN, saying so; a dir with no job says what's missing."""
    t0 = time.time() - 600
    died = _run_dir(tmp_path / "died", at=t0, launcher=_dead_pid())
    # the launcher began 10 s before this process, which has its PID now
    recycled = _run_dir(tmp_path / "recycled", at=t0, launcher=os.getpid(),
                        born=psutil.Process().create_time() - 10)
    for run in (died, recycled):
        assert status(run) == 1
        out = capsys.readouterr().out
        assert _states(out) == {"job": "DOWN"} and "is gone before it started a daemon" in out
        once = _top(str(run), "--once", "--interval", "0.1")
        assert once.returncode == 1 and "DOWN" in once.stdout, (once.stdout, once.stderr)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="neither .*job.json.* nor .*ports.json"):
        status(tmp_path / "empty")


def test_a_lock_whose_mtime_is_skewed_still_names_its_live_launcher(tmp_path):
    run = tmp_path / "run"
    os.close(lock_run_dir(run))
    skewed = psutil.Process().create_time() - 5
    os.utime(run / "job.lock", (skewed, skewed))
    assert live_launcher(run) == os.getpid()
    (run / "job.lock").write_text(f"{os.getpid()}\n")  # a lock without a create_time: no launcher
    assert live_launcher(run) is None


def test_top_waits_through_the_warm_start_then_shows_the_daemons_and_exits_when_it_finishes(
        tmp_path):
    m = Metrics()
    m.gauge("buffer/trainer_version").set(7)
    srv = MetricsServer(m, 0, "127.0.0.1")
    run = _run_dir(tmp_path / "run", at=time.time() - 60, launcher=os.getpid())
    watching = subprocess.Popen([sys.executable, "-m", "launch.cli", "top", str(run),
                                 "--interval", "0.2"], stdout=subprocess.PIPE, text=True)
    try:
        assert "starting" in watching.stdout.readline()
        _job(run, [("buffer", srv.port, os.getpid())])  # the launcher starts its daemons
        while "trainer step -" not in (line := watching.stdout.readline()):
            assert line, "top exited"
        _finish(run)
        # read on through the text stream readline() buffered: communicate() would read the
        # pipe from behind that buffer, starting mid-character; a top that never exits is killed
        killer = threading.Timer(30, watching.kill)
        killer.start()
        rest = watching.stdout.read()
        killer.cancel()
        assert watching.wait() == 0, rest
        last = rest[rest.rindex("trainer step -"):].splitlines()  # a last view, then exit 0
        rows = [[c.strip() for c in ln.split("│")[1:3]] for ln in last if ln.startswith("│")]
        assert "job finished" in last[0] and rows == [["buffer", "finished"]], rest
    finally:
        watching.kill()
        watching.wait()
        srv.stop()


def test_top_without_the_metrics_token_says_so(tmp_path):
    srv = MetricsServer(Metrics(), 0, "127.0.0.1", token="t0k")
    try:
        _ports(tmp_path, [("buffer", srv.port, os.getpid())])
        env = {k: v for k, v in os.environ.items() if k != METRICS_TOKEN_ENV}
        done = run_cli("top", str(tmp_path), "--once", "--interval", "0.1", timeout=30, env=env)
        assert done.returncode == 1 and "401" in done.stderr, (done.stdout, done.stderr)
        assert METRICS_TOKEN_ENV in done.stderr
        done = run_cli("top", str(tmp_path), "--once", "--interval", "0.1", timeout=30,
                       env={**env, METRICS_TOKEN_ENV: "t0k"})
        assert done.returncode == 0 and "ok" in done.stdout, (done.stdout, done.stderr)
    finally:
        srv.stop()


def test_a_job_started_without_run_ends_on_a_done_record_newer_than_its_ports(tmp_path, capsys):
    """No summary.json: a done record below trainer.steps is a stop, at it a completion."""
    _ports(tmp_path, [("trainer", free_port(), None)])
    (tmp_path / "metrics").mkdir()
    done = {"event": "done", "policy_version": 3, "steps": 3}
    older = os.stat(tmp_path / "ports.json").st_mtime - 60
    for record, words in [({**done, "time": older}, None),
                          ({**done, "policy_version": 2, "time": time.time() + 1},
                           "stopped at step 2 of 3"),
                          ({**done, "time": time.time() + 1}, "completed at step 3 of 3")]:
        (tmp_path / "metrics" / "trainer.jsonl").write_text(
            json.dumps({"step": 3, "reward_mean": 0.5}) + "\n" + json.dumps(record) + "\n")
        assert status(tmp_path) == 1
        out = capsys.readouterr().out
        if words is None:  # older than the job: not its end
            assert out.split()[:2] == ["trainer", "DOWN"], out
        else:
            job, trainer = out.splitlines()[:2]
            assert job == f"job          {words}" and trainer.split()[:2] == ["trainer", "finished"]
    watched = _top(str(tmp_path), "--interval", "0.2")
    assert watched.returncode == 0 and "job completed" in watched.stdout, watched.stdout


def _lock_holder(run_dir, launcher_pid: str | None = None) -> subprocess.Popen:
    """A process holding run_dir's job lock (SIGTERM ends it); launcher_pid written over its own."""
    code = ("import sys, pathlib; from launch.rundir import lock_run_dir; "
            "fd = lock_run_dir(pathlib.Path(sys.argv[1])); "
            "sys.argv[2:] and (pathlib.Path(sys.argv[1]) / 'job.lock').write_text(sys.argv[2]); "
            "print('locked', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir),
                             *([launcher_pid] if launcher_pid else [])],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "locked\n"
    return proc


def test_stop_ends_the_job_as_ctrl_c_does_and_waits_for_it(tmp_path, capsys):
    run = tmp_path / "run"
    proc = _lock_holder(run)
    try:
        assert main(["stop", str(run)]) == 0
        assert proc.wait(timeout=60) == -15
        out = capsys.readouterr().out
        assert f"(areal-like run pid {proc.pid})" in out and out.endswith("stopped\n"), out
        assert main(["stop", str(run)]) == 0
        assert capsys.readouterr().out == f"no job is running in {run}\n"
        assert main(["stop", str(tmp_path / "typo")]) == 2
        assert "is not a run directory" in capsys.readouterr().err
    finally:
        proc.kill()
        proc.wait()


def test_stop_after_the_launcher_was_killed_waits_for_its_daemons(tmp_path, capsys):
    """Launcher killed -9: stop signals no one and waits for the daemons, up to --timeout."""
    run = tmp_path / "run"
    daemon = _lock_holder(run, launcher_pid=f"{_dead_pid()} 1.0")
    try:
        assert main(["stop", str(run), "--timeout", "0.3"]) == 1
        out, err = capsys.readouterr()
        assert "areal-like run is gone" in out and "still runs after 0.3s" in err
        assert daemon.poll() is None  # not signalled
    finally:
        daemon.kill()
        daemon.wait()
    assert main(["stop", str(run)]) == 0


def _ended(run_dir, code: int, reached: int, steps: int = 10, checkpoint: str | None = None):
    """An ended job's records: trainer.jsonl to reached, summary.json, job.json ended."""
    (run_dir / "metrics").mkdir(exist_ok=True)
    recs = [{"step": s, "policy_version": s, "reward_mean": 0.5} for s in range(1, reached + 1)]
    recs.append({"event": "done", "policy_version": reached, "steps": steps, "steps_trained":
                 reached, "rolled_back_steps": 0, "nonfinite_skipped": 0, "time": time.time()})
    (run_dir / "metrics" / "trainer.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    summary = summarize(run_dir, 1.0, code, trainer_steps=steps, checkpoint=checkpoint)
    _finish(run_dir, summary)
    return summary


@pytest.mark.parametrize("code, reached, words", [
    (0, 10, "completed at step 10 of 10"),
    (143, 4, "stopped at step 4 of 10 by SIGTERM; last checkpoint {ckpt}"),
    (130, 10, "stopped at step 10 of 10 by SIGINT; last checkpoint {ckpt}"),  # final eval cut
    (1, 4, "failed (exit 1) at step 4 of 10; last checkpoint {ckpt}")])
def test_status_and_top_tell_a_completed_job_from_a_stopped_or_failed_one(tmp_path, capsys, code,
                                                                           reached, words):
    ckpt = str(tmp_path / "checkpoints" / f"v{reached:08d}")
    _job(tmp_path, [("buffer", free_port(), _dead_pid())])
    summary = _ended(tmp_path, code, reached, checkpoint=ckpt)
    assert summary["end"] == words.split()[0] and summary["ok"] is (code == 0)
    assert status(tmp_path) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"job          {words.format(ckpt=ckpt)}", out
    assert out[1].split()[:2] == ["buffer", "finished"], out
    watched = _top(str(tmp_path), "--once")
    assert watched.returncode == 0, watched.stderr
    head = " ".join(watched.stdout.split("\nbuffer")[0].split())  # wrapped at 160 columns
    assert head.endswith(f"job {words.format(ckpt=ckpt)}"), watched.stdout


def test_status_tells_starting_up_and_down_apart(tmp_path, capsys):
    """up, starting (alive or 503) and DOWN (dead, raising, wedged); PID from /health if none."""
    def broken():
        raise RuntimeError("probe broke")

    srv = MetricsServer(Metrics(), 0, "127.0.0.1")
    loading = MetricsServer(Metrics(), 0, "127.0.0.1", health=lambda: (False, {"name": "r"}))
    failing = MetricsServer(Metrics(), 0, "127.0.0.1", health=broken)
    waiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    wedged = socket.create_server(("127.0.0.1", 0))  # the kernel completes the handshake only
    try:
        _ports(tmp_path, [("buffer", srv.port, None)])
        assert status(tmp_path) == 0  # every daemon up
        assert capsys.readouterr().out.split()[:3] == ["buffer", "up", f"pid={os.getpid()}"]
        _ports(tmp_path, [("buffer", srv.port, os.getpid()),
                          ("rollout-0", free_port(), waiting.pid),  # no port open yet
                          ("trainer", free_port(), _dead_pid()),
                          ("rollout-1", wedged.getsockname()[1], os.getpid()),
                          ("rollout-2", loading.port, os.getpid()),
                          ("rollout-3", failing.port, os.getpid()),
                          ("rollout-4", free_port(), None)])
        assert status(tmp_path) == 1
        out = capsys.readouterr().out
        assert _states(out) == {
            "buffer": "up", "rollout-0": "starting", "trainer": "DOWN", "rollout-1": "DOWN",
            "rollout-2": "starting", "rollout-3": "DOWN", "rollout-4": "DOWN"}, out
        lines = {ln.split()[0]: ln for ln in out.splitlines()}
        assert "uptime" in lines["rollout-2"] and lines["rollout-4"].split()[2] == "pid=-", out
    finally:
        for server in (srv, loading, failing):
            server.stop()
        waiting.kill()
        waiting.wait()
        wedged.close()


def test_top_once_prints_plain_tables_fails_when_nothing_answers_and_names_a_bad_ports_file(
        tmp_path):
    m = Metrics()
    m.gauge("buffer/trainer_version").set(7)
    srv = MetricsServer(m, 0, "127.0.0.1")
    try:
        _ports(tmp_path, [("buffer", srv.port, None)])
        once = _top(str(tmp_path), "--once", "--interval", "0.2")
        assert once.returncode == 0, once.stderr
        assert "trainer step -" in once.stdout and "buffer" in once.stdout and "7" in once.stdout
        assert "\x1b[" not in once.stdout  # no terminal control codes in a pipe
    finally:
        srv.stop()
    once = _top(str(tmp_path), "--once", "--interval", "0.1")  # nobody listens there now
    assert once.returncode == 1, (once.returncode, once.stdout, once.stderr)
    (tmp_path / "ports.json").write_text('{"daemons": [{"name": "buffer"}]}')
    bad = _top(str(tmp_path), "--once", "--interval", "0.1")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert "ports.json is not a ports file" in bad.stderr and "health_url" in bad.stderr, bad.stderr
    (tmp_path / "ports.json").write_text("{not json")
    assert "is not a ports file" in run_cli("status", str(tmp_path), timeout=120).stderr
