"""launch/local.py's Supervisor and `run` with real processes: DUMMY daemons serve /health and may
spawn a rank in its own session (as torchrun's), orphaned by a kill -9 of their leader."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import psutil
import pytest

from areal_like.net.distributed import free_port
from launch.job import report_failure
from launch.local import ProcSpec, Supervisor, error_tail, probe
from tests.conftest import run_cli, wait_until

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
    sup = Supervisor(specs, tmp_path / "run", restarts=2, health_timeout_s=60, echo=lines.append,
                     restart_backoff_s=0.1)
    with _Run(sup) as run:
        wait_until(lambda: any("all 3 processes healthy" in ln for ln in lines))
        run.track()
        assert all(probe(s.health_url) for s in specs)
        # every daemon's output is streamed with its name and kept in logs/<name>.log
        wait_until(lambda: any(ln.strip().startswith("rollout-0 | dummy up") for ln in lines))
        assert "dummy up" in (tmp_path / "run" / "logs" / "buffer.log").read_text()

        # kill -9 of a daemon: restarted under a new PID and healthy again
        old = sup.proc("rollout-0").popen.pid
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: sup.pids()["rollout-0"] not in (None, old))
        wait_until(lambda: probe(specs[1].health_url))
        assert sup.proc("rollout-0").restarts == 1

        # kill -9 of a torchrun-like leader orphans its rank (own session): the supervisor
        # records it and kills it by PID before the restart
        wait_until(lambda: pidfile.is_file() and pidfile.read_text().strip() != "")
        rank = int(pidfile.read_text())
        wait_until(lambda: rank in sup.proc("trainer").descendants)
        os.kill(sup.proc("trainer").popen.pid, signal.SIGKILL)
        wait_until(lambda: not _alive(rank), what="the orphaned rank to die with its leader")
        wait_until(lambda: sup.pids()["trainer"] is not None
                     and sup.proc("trainer").restarts == 1)
        wait_until(lambda: pidfile.read_text().strip() not in ("", str(rank)))
        wait_until(lambda: len(sup.proc("trainer").descendants) == 1)
        run.track()
    assert run.code == 1 and sup.outcome == "stopped on request"
    assert not _alive(int(pidfile.read_text()))


def _until_done(specs: list[ProcSpec], run_dir: Path, restarts: int, **kw) -> tuple[int, object]:
    """(exit code, supervisor) of a job run to its own end; nothing it started survives."""
    sup = Supervisor(specs, run_dir, restarts=restarts, echo=lambda _: None,
                     **{"health_timeout_s": 60, **kw})
    with _Run(sup) as run:
        wait_until(lambda: not run.thread.is_alive(), 120)
        run.track()
    return run.code, sup


def _torchrun_rank_refusing(tmp_path: Path) -> list[ProcSpec]:
    rank = tmp_path / "rank.py"
    rank.write_text("import sys\nprint('error: this checkpoint holds another model', flush=True)\n"
                    "sys.exit(2)\n")
    argv = [sys.executable, "-m", "launch.torchrun", "--standalone", "--nproc-per-node", "2",
            "--log-dir", str(tmp_path / "torchrun"), str(rank)]
    return [ProcSpec(name="trainer", argv=argv, main=True, env={"PYTHONPATH": str(ROOT)})]


def _health_never_answers(spec: ProcSpec) -> list[ProcSpec]:
    spec.health_url = f"http://127.0.0.1:{free_port()}/health"
    return [spec]


# id: (the daemons, restarts, supervisor settings, exit code, outcome (a regex), the daemon that
# failed, its restarts, a line of its error tail, its last if a traceback's ({pid}: its last PID))
ENDS = {
    "main_exits_0": (lambda d, t: [_spec(d, "buffer", stage=0),
                                   _spec(d, "trainer", mode="exit_after_2", main=True)],
                     0, {}, 0, "^trainer completed$", None, None, None),
    # a short trainer can exit 0 while its health is still awaited: the job completes
    "main_exits_0_before_it_is_healthy": (
        lambda d, t: [_spec(d, "buffer", stage=0),
                      *_health_never_answers(_spec(d, "trainer", "exit_after_0.2", main=True))],
        0, {}, 0, "^trainer completed$", None, None, None),
    # the stubborn one ignores SIGTERM: SIGKILLed at the stop (_Run checks it is gone)
    "sigterm_ignored_and_restarts_bounded": (
        lambda d, t: [_spec(d, "stubborn", mode="ignore_term", stage=0),
                      _spec(d, "crasher", mode="crash", health=False)],
        2, {"stop_grace_s": 1.0, "restart_backoff_s": 0.1, "restart_backoff_max_s": 0.1}, 1,
        r"crasher exited with 3 and has no restarts left \(2 within 3600s\)", "crasher", 2, None),
    # exit 2 is a refusal: the job fails at once (exit 2, as run's), no restarts
    "refuses_its_settings": (
        lambda d, t: [_spec(d, "buffer", stage=0), _spec(d, "trainer", mode="refuse", main=True)],
        3, {}, 2, r"trainer refused to start \(exit 2\)", "trainer", 0,
        "error: this run's settings cannot be served"),
    # a rank's exit 2 passes through torchrun, without a traceback
    "a_torchrun_rank_refuses": (lambda d, t: _torchrun_rank_refusing(t), 3, {}, 2,
                                r"trainer refused to start \(exit 2\)", "trainer", 0,
                                "error: this checkpoint holds another model"),
    "never_healthy": (lambda d, t: [ProcSpec(name="never", argv=[
        sys.executable, "-c", "import time; time.sleep(600)"],
        health_url=f"http://127.0.0.1:{free_port()}/health")],
        0, {"health_timeout_s": 2}, 1, "not healthy", "never", 0, None),
    # the failed daemon is named, with the traceback of its last start, not its first
    "traceback": (lambda d, t: [_spec(d, "buffer", stage=0),
                                _spec(d, "rollout-0", mode="traceback", health=False)],
                  1, {}, 1, "rollout-0", "rollout-0", 1, "RuntimeError: boom in pid {pid}"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", ENDS)
def test_how_a_job_ends(case, dummy, tmp_path):
    daemons, restarts, kw, code, outcome, failed, failed_restarts, last = ENDS[case]
    got, sup = _until_done(daemons(dummy, tmp_path), tmp_path / "run", restarts, **kw)
    assert (got, sup.failed) == (code, failed) and re.search(outcome, sup.outcome), sup.outcome
    if failed is None:
        return
    assert sup.proc(failed).restarts == failed_restarts
    tail = error_tail(tmp_path / "run" / "logs" / f"{failed}.log")
    if code == 2:  # a refusal: its error line, no traceback
        assert not any("Traceback" in line for line in tail), tail
    elif last is not None:
        assert tail[0] == "Traceback (most recent call last):", tail
    if last is not None:
        line = last.format(pid=sup.proc(failed).popen.pid)
        # torchrun's own line comes last, after its ranks' (whose writes may share a line)
        assert line == tail[-1] or "torchrun" in case and line in "\n".join(tail), tail
        out = io.StringIO()
        report_failure(tmp_path / "run", failed, out)
        assert out.getvalue().splitlines()[-1] == "    " + tail[-1]


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
    go, port = tmp_path / "go", free_port()
    trainer = ProcSpec(name="trainer", main=True, env={"PYTHONPATH": str(ROOT)},
                       argv=[sys.executable, "-c", STOPS_LATER, str(port), str(go)],
                       health_url=f"http://127.0.0.1:{port}/health")
    lines: list[str] = []
    sup = Supervisor([_spec(dummy, "buffer", stage=0), trainer], tmp_path / "run", restarts=3,
                     health_timeout_s=60, echo=lines.append)
    with _Run(sup) as run:
        wait_until(lambda: any("all 2 processes healthy" in ln for ln in lines), 90)
        go.touch()  # the job ran: now the trainer stops
        wait_until(lambda: not run.thread.is_alive(), 90)
        run.track()
    assert run.code == 1 and sup.failed == "trainer", sup.outcome
    assert "trainer stopped with exit 2" in sup.outcome and "refused" not in sup.outcome
    assert sup.proc("trainer").restarts == 0


@pytest.mark.slow
def test_a_sigterm_to_torchrun_stops_its_ranks_in_one_line_without_a_traceback(tmp_path):
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
def test_quiet_run_prints_why_the_job_failed(tmp_path):
    (tmp_path / "afile").write_text("")
    r = run_cli("run", "-q", f"run_dir={tmp_path / 'run'}", "warm_start.steps=0",
                f"buffer.wal_dir={tmp_path / 'afile' / 'wal'}", "launch.restarts=0",
                timeout=180, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert json.loads(r.stdout)["ok"] is False
    assert (f"[run] buffer failed; the end of {tmp_path / 'run' / 'logs' / 'buffer.log'}:"
            in r.stderr)
    assert "    Traceback (most recent call last):" in r.stderr
    assert r.stderr.rstrip().endswith(
        f"NotADirectoryError: [Errno 20] Not a directory: '{tmp_path / 'afile' / 'wal'}'")
    assert " | " not in r.stderr  # quiet: no streamed daemon lines, only the failure report


@pytest.mark.slow
def test_a_trainer_that_refuses_to_start_fails_run_with_exit_2_and_its_line(tmp_path):
    """Refused at start: run exits 2 with its line; run_dir's files are left as they were."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port, run_dir = taken.getsockname()[1], tmp_path / "run"
    args = (f"run_dir={run_dir}", "experiment=quickstart", "warm_start.steps=0",
            "eval.at_end=false")
    files = [run_dir / "settings.yaml", run_dir / "config.yaml", run_dir / "job.json"]
    kw = {"timeout": 180, "cwd": tmp_path}
    with taken:
        r = run_cli("run", "-q", *args, f"trainer.metrics_port={port}", "trainer.steps=1", **kw)
        assert not any(f.exists() for f in files), [f.name for f in files if f.exists()]
        trained = run_cli("run", "-q", *args, "trainer.steps=1", **kw)
        assert trained.returncode == 0, trained.stderr[-3000:]
        before = [f.read_bytes() for f in files]
        again = run_cli("run", "-q", *args, f"trainer.metrics_port={port}", "trainer.steps=2", **kw)
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
    crasher = _spec(dummy, "crasher", mode="crash", health=False)
    lines: list[str] = []
    sup = Supervisor([crasher], tmp_path / "run", restarts=2, health_timeout_s=60,
                     echo=lines.append,
                     restart_window_s=0.3, restart_backoff_s=0.4, restart_backoff_max_s=0.4)
    with _Run(sup) as run:
        wait_until(lambda: sup.proc("crasher").restarts >= 4, 90)  # past the budget of 2
        run.track()
    assert run.code == 1 and sup.outcome == "stopped on request" and sup.failed is None
    restarts = [ln for ln in lines if "crasher exited with 3; restart" in ln]
    assert len(restarts) >= 4 and all("restart 1/2 in the last 0s" in ln and "after 0.4s" in ln
                                      for ln in restarts)
