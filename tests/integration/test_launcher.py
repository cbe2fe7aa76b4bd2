"""launch/local.py Supervisor with real processes: start, health, logs, restart, stop, no leftovers.

Daemons are small programs in tmp_path serving /health, printing, and able to spawn a child in
its own session (as torchrun's ranks), orphaned by a kill -9 of the leader.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from areal_like.net.distributed import free_port
from launch.job import report_failure
from launch.local import ProcSpec, Supervisor, error_tail, probe

ROOT = Path(__file__).resolve().parents[2]

DUMMY = textwrap.dedent('''
    import http.server, os, signal, subprocess, sys, threading, time
    port, mode = int(sys.argv[1]), sys.argv[2]
    pidfile = sys.argv[3] if len(sys.argv) > 3 else None
    if mode == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    if pidfile:  # a "rank" in its own session, like torchrun's children
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], '''
                                 '''start_new_session=True)
        open(pidfile, "w").write(str(child.pid))
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
            probed.set()
        def log_message(self, *a): pass
    probed = threading.Event()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    print(f"dummy up pid={os.getpid()} port={port}", flush=True)
    if mode == "traceback":  # a daemon that fails at start with a Python traceback
        raise RuntimeError(f"boom in pid {os.getpid()}")
    t0 = time.time()
    while True:
        if mode.startswith("exit_after_"):
            if time.time() - t0 > float(mode.split("_")[2]):
                print("done", flush=True)
                sys.exit(0)
        if mode == "crash":
            sys.exit(3)
        if mode == "refuse" and probed.wait(60):  # refusing its settings once seen healthy
            time.sleep(0.5)  # (StartRefused in start(), after /health answered)
            print("error: this run's settings cannot be served", flush=True)
            sys.exit(2)
        time.sleep(0.05)
''')


@pytest.fixture
def dummy(tmp_path: Path) -> Path:
    path = tmp_path / "dummy.py"
    path.write_text(DUMMY)
    return path


def _spec(dummy: Path, name: str, mode: str = "serve", stage: int = 1, main: bool = False,
          pidfile: Path | None = None, health: bool = True) -> ProcSpec:
    port = free_port()
    argv = [sys.executable, str(dummy), str(port), mode] + ([str(pidfile)] if pidfile else [])
    return ProcSpec(name=name, argv=argv,
                    health_url=f"http://127.0.0.1:{port}/health" if health else None,
                    stage=stage, main=main)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait(cond, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


class _Run:
    """Run a supervisor on a thread; always stop it and check nothing it started survives."""

    def __init__(self, sup: Supervisor):
        self.sup, self.code, self.seen_pids = sup, None, set()
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self):
        self.code = self.sup.run()

    def __enter__(self):
        self.thread.start()
        return self

    def track(self):
        for p in self.sup.procs:
            if p.popen is not None:
                self.seen_pids.add(p.popen.pid)
            self.seen_pids |= set(p.descendants)

    def __exit__(self, *exc):
        self.sup.request_stop()
        self.thread.join(timeout=120)
        assert not self.thread.is_alive(), "supervisor did not stop"
        leftovers = [pid for pid in self.seen_pids if _alive(pid)]
        for pid in leftovers:  # clean up for the next test before failing this one
            os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"processes left behind: {leftovers}"


@pytest.mark.slow
def test_start_health_logs_restart_and_clean_stop(dummy, tmp_path):
    pidfile = tmp_path / "rank.pid"
    specs = [_spec(dummy, "buffer", stage=0), _spec(dummy, "rollout-0"),
             _spec(dummy, "trainer", pidfile=pidfile, main=True)]
    lines: list[str] = []
    sup = Supervisor(specs, tmp_path / "run", restarts=2, health_timeout_s=60, echo=lines.append)
    with _Run(sup) as run:
        assert _wait(lambda: any("all 3 processes healthy" in ln for ln in lines)), lines
        run.track()
        assert all(probe(s.health_url) for s in specs)
        # every daemon's output is streamed with its name and kept in logs/<name>.log
        assert _wait(lambda: any(ln.strip().startswith("rollout-0 | dummy up") for ln in lines))
        assert "dummy up" in (tmp_path / "run" / "logs" / "buffer.log").read_text()

        # kill -9 of a daemon: restarted under a new PID and healthy again
        old = sup.proc("rollout-0").popen.pid
        os.kill(old, signal.SIGKILL)
        assert _wait(lambda: sup.pids()["rollout-0"] not in (None, old))
        assert _wait(lambda: probe(specs[1].health_url))
        assert sup.proc("rollout-0").restarts == 1

        # kill -9 of a torchrun-like leader orphans its rank (own session): the supervisor
        # records it and kills it by PID before the restart
        assert _wait(lambda: pidfile.is_file() and pidfile.read_text().strip() != "")
        rank = int(pidfile.read_text())
        assert _wait(lambda: rank in sup.proc("trainer").descendants)
        os.kill(sup.proc("trainer").popen.pid, signal.SIGKILL)
        assert _wait(lambda: not _alive(rank)), "orphaned rank survived its leader's kill -9"
        assert _wait(lambda: sup.pids()["trainer"] is not None
                     and sup.proc("trainer").restarts == 1)
        assert _wait(lambda: pidfile.read_text().strip() not in ("", str(rank)))
        assert _wait(lambda: len(sup.proc("trainer").descendants) == 1)
        run.track()
    assert run.code == 1 and sup.outcome == "stopped on request"
    assert not _alive(int(pidfile.read_text()))


@pytest.mark.slow
def test_main_exit_zero_completes_the_job_and_stops_the_rest(dummy, tmp_path):
    specs = [_spec(dummy, "buffer", stage=0),
             _spec(dummy, "trainer", mode="exit_after_2", main=True)]
    sup = Supervisor(specs, tmp_path / "run", restarts=0, health_timeout_s=60, echo=lambda _: None)
    with _Run(sup) as run:
        assert _wait(lambda: not run.thread.is_alive(), 90)
        run.track()
    assert run.code == 0 and sup.outcome == "trainer completed"


@pytest.mark.slow
def test_a_main_process_that_completes_before_it_is_seen_healthy_completes_the_job(dummy, tmp_path):
    # A short trainer (one rank, a few steps) can finish while the supervisor still waits on its
    # health: its exit 0 is the job's completion, not a failure. Its health URL here answers never.
    trainer = _spec(dummy, "trainer", mode="exit_after_0.2", main=True)
    trainer.health_url = f"http://127.0.0.1:{free_port()}/health"
    sup = Supervisor([_spec(dummy, "buffer", stage=0), trainer], tmp_path / "run", restarts=0,
                     health_timeout_s=60, echo=lambda _: None)
    with _Run(sup) as run:
        assert _wait(lambda: not run.thread.is_alive(), 90)
        run.track()
    assert run.code == 0 and sup.outcome == "trainer completed"


@pytest.mark.slow
def test_sigterm_ignored_gets_sigkill_and_restarts_are_bounded(dummy, tmp_path):
    stubborn = _spec(dummy, "stubborn", mode="ignore_term", stage=0)
    crasher = _spec(dummy, "crasher", mode="crash", health=False)
    sup = Supervisor([stubborn, crasher], tmp_path / "run", restarts=2, health_timeout_s=60,
                     stop_grace_s=1.0, echo=lambda _: None)
    with _Run(sup) as run:
        assert _wait(lambda: not run.thread.is_alive(), 90)
        run.track()
    assert run.code == 1
    assert "crasher exited with 3 and has no restarts left (2 within 3600s)" in sup.outcome
    assert sup.proc("crasher").restarts == 2
    assert not _alive(sup.proc("stubborn").popen.pid)


@pytest.mark.slow
def test_a_daemon_that_refuses_its_settings_fails_the_job_without_restarts(dummy, tmp_path):
    """Exit 2 is a refusal: the job fails at once, no restarts."""
    specs = [_spec(dummy, "buffer", stage=0), _spec(dummy, "trainer", mode="refuse", main=True)]
    sup = Supervisor(specs, tmp_path / "run", restarts=3, health_timeout_s=60, echo=lambda _: None)
    with _Run(sup) as run:
        assert _wait(lambda: not run.thread.is_alive(), 90)
        run.track()
    assert run.code == 2 and sup.failed == "trainer", sup.outcome  # a refusal: exit 2, as run's
    assert "trainer refused to start (exit 2)" in sup.outcome
    assert sup.proc("trainer").restarts == 0
    assert error_tail(tmp_path / "run" / "logs" / "trainer.log")[-1] == (
        "error: this run's settings cannot be served")


STOPS_LATER = textwrap.dedent('''
    import os, sys, time
    from areal_like.daemon import Daemon, StartRefused
    class Trainer(Daemon):
        name = "trainer"
        def run(self):  # started (its "started" line is out): minutes of training, then
            while not os.path.exists(sys.argv[2]):
                time.sleep(0.05)
            raise StartRefused("the buffer's data is staler than buffer.max_staleness")
    sys.exit(Trainer(metrics_port=int(sys.argv[1])).serve())
''')


@pytest.mark.slow
def test_a_daemon_that_exits_2_after_it_started_is_said_to_have_stopped(dummy, tmp_path):
    """Exit 2 after started is 'stopped with exit 2', still no restarts."""
    go, port = tmp_path / "go", free_port()
    trainer = ProcSpec(name="trainer", main=True, env={"PYTHONPATH": str(ROOT)},
                       argv=[sys.executable, "-c", STOPS_LATER, str(port), str(go)],
                       health_url=f"http://127.0.0.1:{port}/health")
    lines: list[str] = []
    sup = Supervisor([_spec(dummy, "buffer", stage=0), trainer], tmp_path / "run", restarts=3,
                     health_timeout_s=60, echo=lines.append)
    with _Run(sup) as run:
        assert _wait(lambda: any("all 2 processes healthy" in ln for ln in lines), 90), lines
        go.touch()  # the job ran: now the trainer stops
        assert _wait(lambda: not run.thread.is_alive(), 90)
        run.track()
    assert run.code == 1 and sup.failed == "trainer", sup.outcome
    assert "trainer stopped with exit 2" in sup.outcome and "refused" not in sup.outcome
    assert sup.proc("trainer").restarts == 0


@pytest.mark.slow
def test_a_trainer_of_several_ranks_that_refuses_fails_the_job_without_restarts(tmp_path):
    """A rank's exit 2 passes through torchrun: the job fails, no restarts."""
    rank = tmp_path / "rank.py"
    rank.write_text("import sys\nprint('error: this checkpoint holds another model', flush=True)\n"
                    "sys.exit(2)\n")
    argv = [sys.executable, "-m", "launch.torchrun", "--standalone", "--nproc-per-node", "2",
            "--log-dir", str(tmp_path / "torchrun"), str(rank)]
    specs = [ProcSpec(name="trainer", argv=argv, main=True, env={"PYTHONPATH": str(ROOT)})]
    sup = Supervisor(specs, tmp_path / "run", restarts=3, health_timeout_s=60, echo=lambda _: None)
    with _Run(sup) as run:
        assert _wait(lambda: not run.thread.is_alive(), 120)
        run.track()
    assert "trainer refused to start (exit 2)" in sup.outcome, sup.outcome
    assert sup.proc("trainer").restarts == 0
    tail = error_tail(tmp_path / "run" / "logs" / "trainer.log")
    assert "error: this checkpoint holds another model" in "\n".join(tail), tail
    assert not any("Traceback" in line for line in tail), tail


@pytest.mark.slow
def test_a_sigterm_to_torchrun_stops_its_ranks_in_one_line_without_a_traceback(tmp_path):
    """SIGTERM to areal-like train stops the ranks in one line, no traceback."""
    rank = tmp_path / "rank.py"
    rank.write_text("import signal, sys, time\n"
                    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
                    "print('rank up', flush=True)\n"
                    "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-m", "launch.torchrun", "--standalone",
                             "--nproc-per-node", "1", str(rank)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip().endswith("rank up")  # waits for the rank
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "torchrun: stopped by SIGTERM", err
    assert proc.returncode == 128 + signal.SIGTERM


@pytest.mark.slow
def test_stop_while_a_daemon_never_becomes_healthy(dummy, tmp_path):
    never = ProcSpec(name="never", argv=[sys.executable, "-c", "import time; time.sleep(600)"],
                     health_url=f"http://127.0.0.1:{free_port()}/health")
    sup = Supervisor([never], tmp_path / "run", restarts=0, health_timeout_s=2, echo=lambda _: None)
    with _Run(sup) as run:
        assert _wait(lambda: not run.thread.is_alive(), 60)
        run.track()
    assert run.code == 1 and "not healthy" in sup.outcome


@pytest.mark.slow
def test_a_failed_job_names_the_daemon_and_shows_its_last_traceback(dummy, tmp_path):
    specs = [_spec(dummy, "buffer", stage=0),
             _spec(dummy, "rollout-0", mode="traceback", health=False)]
    sup = Supervisor(specs, tmp_path / "run", restarts=1, health_timeout_s=60, echo=lambda _: None)
    with _Run(sup) as run:
        assert _wait(lambda: not run.thread.is_alive(), 90)
        run.track()
    assert run.code == 1 and sup.failed == "rollout-0"
    last_pid = sup.proc("rollout-0").popen.pid
    tail = error_tail(tmp_path / "run" / "logs" / "rollout-0.log")
    assert tail[0] == "Traceback (most recent call last):"
    assert tail[-1] == f"RuntimeError: boom in pid {last_pid}"  # the last start's, not the first's
    out = io.StringIO()
    report_failure(tmp_path / "run", sup.failed, out)
    assert out.getvalue().splitlines()[-1] == f"    RuntimeError: boom in pid {last_pid}"


@pytest.mark.slow
def test_quiet_run_prints_why_the_job_failed(tmp_path):
    """run -q with a buffer failing at start: stderr says why."""
    (tmp_path / "afile").write_text("")
    r = subprocess.run([sys.executable, "-m", "launch.cli", "run", "-q",
                        f"run_dir={tmp_path / 'run'}", "warm_start.steps=0",
                        f"buffer.wal_dir={tmp_path / 'afile' / 'wal'}", "launch.restarts=0"],
                       capture_output=True, text=True, timeout=180, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1, r.stderr
    assert json.loads(r.stdout)["ok"] is False
    assert (f"[run] buffer failed; the end of {tmp_path / 'run' / 'logs' / 'buffer.log'}:"
            in r.stderr)
    assert "    Traceback (most recent call last):" in r.stderr
    assert r.stderr.rstrip().endswith(
        f"NotADirectoryError: [Errno 20] Not a directory: '{tmp_path / 'afile' / 'wal'}'")
    assert " | " not in r.stderr  # quiet: no streamed daemon lines, only the failure report


def _run_cli(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", "run", "-q", *overrides],
                          capture_output=True, text=True, timeout=180, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
def test_a_trainer_that_refuses_to_start_fails_run_with_exit_2_and_its_line(tmp_path):
    """A trainer refusing at start: run exits 2 with its line; run_dir files unchanged."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port, run_dir = taken.getsockname()[1], tmp_path / "run"
    args = (f"run_dir={run_dir}", "experiment=quickstart", "warm_start.steps=0",
            "eval.at_end=false")
    files = [run_dir / "settings.yaml", run_dir / "config.yaml", run_dir / "job.json"]
    with taken:
        r = _run_cli(tmp_path, *args, f"trainer.metrics_port={port}", "trainer.steps=2")
        assert not any(f.exists() for f in files), [f.name for f in files if f.exists()]
        trained = _run_cli(tmp_path, *args, "trainer.steps=2")
        assert trained.returncode == 0, trained.stderr[-3000:]
        before = [f.read_bytes() for f in files]
        again = _run_cli(tmp_path, *args, f"trainer.metrics_port={port}", "trainer.steps=3")
    assert again.returncode == 2 and "error: trainer.metrics_port=" in again.stderr, again.stderr
    assert [f.read_bytes() for f in files] == before
    assert r.returncode == 2, r.stderr
    assert json.loads(r.stdout)["ok"] is False
    assert "[supervisor] failed: trainer refused to start (exit 2)" in r.stderr, r.stderr
    assert r.stderr.splitlines()[-2] == (
        f"error: trainer.metrics_port={port}: cannot listen on 127.0.0.1: error while attempting "
        f"to bind on address ('127.0.0.1', {port}): address already in use"), r.stderr
    assert r.stderr.splitlines()[-1] == (
        f"[run] trainer refused to start; its log: {tmp_path / 'run' / 'logs' / 'trainer.log'}")


@pytest.mark.slow
def test_restarts_spread_over_time_do_not_use_up_the_budget(dummy, tmp_path):
    """Crashes spread past the window never use up restarts; back-off stays at base."""
    crasher = _spec(dummy, "crasher", mode="crash", health=False)
    lines: list[str] = []
    sup = Supervisor([crasher], tmp_path / "run", restarts=2, health_timeout_s=60,
                     echo=lines.append,
                     restart_window_s=0.3, restart_backoff_s=0.4, restart_backoff_max_s=0.4)
    with _Run(sup) as run:
        assert _wait(lambda: sup.proc("crasher").restarts >= 6, 90)
        run.track()
    assert run.code == 1 and sup.outcome == "stopped on request" and sup.failed is None
    restarts = [ln for ln in lines if "crasher exited with 3; restart" in ln]
    assert len(restarts) >= 6 and all("restart 1/2 in the last 0s" in ln and "after 0.4s" in ln
                                      for ln in restarts)
