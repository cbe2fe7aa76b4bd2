"""``areal-like top`` and ``areal-like status``: the job seen from its ``/metrics`` and ``/health``.

Both read ``<run_dir>/job.json``, which ``areal-like run`` keeps (``launch/rundir.py``,
``JOB_FILE``: starting, running with its daemons ``{"name", "kind", "pid", "metrics_url",
"health_url"}``, or ended with its summary), and scrape over HTTP, so they work from any machine
that reaches the daemons. A job started without ``areal-like run`` (Slurm, by hand) has a
``ports.json`` with its daemons instead. While ``areal-like run`` prepares the job (preflight,
warm start) both say it is starting. ``status`` says per daemon ``up`` (``/health`` 200; a buffer
on a full disk adds ``refusing new groups:`` and why), ``starting`` (its ``/health`` answers that
it is not ready yet, e.g. a rollout server loading its engine; or its port is not open yet and its
process lives; or ``areal-like run`` has not started it yet), ``finished`` (the job ended; in a job
started without ``areal-like run``, the trainer's ``done`` record is newer than ``ports.json``) or
``DOWN``. Of a job that ended, both say how (``job_end``): completed, stopped at step N of M (by
which signal, and its last checkpoint) or failed (its exit status).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from areal_like.net.answers import read_capped_sync
from areal_like.net.auth import METRICS_TOKEN_ENV
from launch.local import alive
from launch.records import read_jsonl, trainer_done, trainer_jsonl
from launch.rundir import JOB_FILE, LOCK_FILE, read_job

# (column title, kind, series, how):
# how = "value" | "rate" (per second, from a counter) | "mean" (histogram)
COLUMNS = [
    ("version", "buffer", "areal_buffer_trainer_version", "value"),
    ("stored", "buffer", 'areal_buffer_groups{state="stored"}', "value"),
    ("in flight", "buffer", 'areal_buffer_groups{state="in_flight"}', "value"),
    ("consumed/s", "buffer", "areal_buffer_groups_consumed_total", "rate"),
    ("staleness", "buffer", "areal_buffer_staleness", "mean"),
    ("roster", "buffer", "areal_buffer_roster_size", "value"),
    ("version", "rollout", "areal_rollout_policy_version", "value"),
    ("tok/s", "rollout", "areal_rollout_tokens_generated_total", "rate"),
    ("acked/s", "rollout", "areal_rollout_groups_acked_total", "rate"),
    # mean reward of the samples scored since the last refresh (all of them on the first)
    ("reward", "rollout", "areal_rollout_reward_sum/areal_rollout_reward_count", "ratio"),
    ("in flight", "rollout", "areal_rollout_requests_in_flight", "value"),
    ("pause s", "rollout", "areal_rollout_weight_sync_pause_seconds", "mean"),
    ("version", "trainer", "areal_trainer_policy_version", "value"),
    ("reward", "trainer", "areal_trainer_reward_mean", "value"),
    ("staleness max", "trainer", "areal_trainer_staleness_max", "value"),
    ("step s", "trainer", "areal_trainer_step_seconds", "value"),
    ("sync s", "trainer", "areal_trainer_weight_sync_seconds", "value"),
    ("tok/s", "trainer", "areal_trainer_tokens_per_s", "value"),
]


# what status/top say while `areal-like run` has not started a daemon yet
PREPARING = "`areal-like run` prepares the job (preflight, warm start): no daemon started yet"


def newest_run_dir(root: str | Path = "runs") -> str | None:
    """The run directory under ``root`` whose job started last: by job.json's ``started`` (written
    at every start of ``areal-like run``, before the warm start; a start that was refused puts the
    file back as it was), or the modification time of a job started by hand's ports.json."""
    dirs = {p.parent for name in (JOB_FILE, "ports.json") for p in Path(root).glob(f"**/{name}")}
    started = []
    for d in dirs:
        with contextlib.suppress(OSError, TypeError, ValueError):
            started.append((float(read_job(d).get("started") or (d / "ports.json").stat().st_mtime),
                            str(d)))
    return max(started)[1] if started else None


def _live(pid: object, born: object) -> int | None:
    """``pid`` if it is a live process created at ``born`` (psutil's create_time, from this
    machine's process table: a later process that reuses the PID has another), else None."""
    try:
        same = psutil.Process(int(pid)).create_time() == float(born)
    except (TypeError, ValueError, psutil.Error):
        return None
    return int(pid) if same and alive(int(pid)) else None


def launcher(run_dir: Path) -> int | None:
    """The PID of the live ``areal-like run`` that took ``run_dir``'s job lock (``pid_lock``: its
    PID and create_time)."""
    try:
        return _live(*(Path(run_dir) / LOCK_FILE).read_text().split()[:2])
    except (OSError, TypeError):  # no lock, or not "pid time"
        return None


def preparing(run_dir: Path) -> int | None:
    """The PID of the ``areal-like run`` that prepares ``run_dir``'s job and has not started a
    daemon yet (preflight, warm start: job.json says starting); None otherwise."""
    job = read_job(Path(run_dir))
    if job.get("state") != "starting":
        return None
    return _live(job.get("supervisor_pid"), job.get("supervisor_born"))


def load_job(run_dir: str | Path) -> dict:
    """job.json, or a job started without ``areal-like run``'s ports.json; SystemExit saying what
    is missing or wrong."""
    if (job := read_job(Path(run_dir))).get("state") in ("starting", "running", "ended"):
        return {"daemons": [], **job}
    path = Path(run_dir) / "ports.json"
    if not path.is_file():
        raise SystemExit(f"error: neither {Path(run_dir) / JOB_FILE} (`areal-like run` keeps it) "
                         f"nor {path} (the Slurm script writes it; for daemons started by hand "
                         "write it: launch/MULTINODE.md, \"Watching it\") found")
    try:
        info = json.loads(path.read_text())
        names = [(d["name"], d["health_url"], d["metrics_url"]) for d in info["daemons"]]
    except (ValueError, TypeError, KeyError) as e:  # a hand-written one (multi-node): say what
        raise SystemExit(f"error: {path} is not a ports file: {type(e).__name__}: {e} (each of its "
                         "`daemons` needs name, health_url and metrics_url)") from None
    if not names:
        raise SystemExit(f"error: {path} lists no daemons")
    return info


HEALTH_ANSWER_BYTES = 64 << 10  # a daemon's /health: its state in a few hundred bytes


def health(url: str, timeout_s: float = 2.0) -> tuple[bool, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            body = read_capped_sync(r, url, HEALTH_ANSWER_BYTES, "status")
            return r.status == 200, json.loads(body or b"{}")
    except urllib.error.HTTPError as e:  # 503: the daemon answers but reports itself unhealthy
        try:
            return False, json.loads(read_capped_sync(e, url, HEALTH_ANSWER_BYTES, "status")
                                     or b"{}")
        except ValueError:
            return False, {"error": f"HTTP {e.code}"}
    except Exception as e:
        return False, {"error": f"{type(e).__name__}: {e}"}


def job_end(run_dir: Path, info: dict) -> str | None:
    """How the job of ``run_dir`` (``info``: ``load_job``'s) ended (``end_words``), or None while
    it has not: job.json says so, or, started without ``areal-like run`` (no supervisor: Slurm, by
    hand), its trainer's ``done`` record was written after its ports.json."""
    if info.get("state") == "ended":
        return end_words(info.get("summary") or {})
    done = None if "supervisor_pid" in info else trainer_done(run_dir)
    if done is None or float(done.get("time", 0.0)) < (run_dir / "ports.json").stat().st_mtime:
        return None
    version, steps = done.get("policy_version"), done.get("steps")
    stopped = isinstance(version, int) and isinstance(steps, int) and version < steps
    return end_words({"end": "stopped" if stopped else "completed", "policy_version": version,
                      "trainer_steps": steps})


def end_words(summary: dict) -> str:
    """``completed at step M of M``, ``stopped at step N of M by SIGTERM; last checkpoint ...``
    or ``failed (exit 1) at step N of M ...``, from summary.json (``launch.records.summarize``);
    ``finished`` for one that does not say (an older version's)."""
    end = summary.get("end") or "finished"
    code, at, of = (summary.get(k) for k in ("exit_code", "policy_version", "trainer_steps"))
    words = [end]
    if end == "failed" and code is not None:
        words.append(f"(exit {code})")
    if at is not None and of is not None:
        words.append(f"at step {at} of {of}")
    if end == "stopped" and isinstance(code, int) and code > 128:
        with contextlib.suppress(ValueError):
            words.append(f"by {signal.Signals(code - 128).name}")
    if end in ("stopped", "failed") and summary.get("checkpoint"):
        words[-1] += f"; last checkpoint {summary['checkpoint']}"
    return " ".join(words)


def state(ok: bool, details: dict, pid: int | None, finished: bool,
          launching: bool = False) -> str:
    """One daemon's state for ``status`` (module docstring); ``launching``: the launcher of the job
    (ports.json's ``supervisor_pid``) lives, so a daemon without a PID is one it has not started."""
    if ok:
        return "up"
    if finished:
        return "finished"
    if details.get("ok") is False and "error" not in details:
        # it answers (so its process lives) and its own health says not ready: a rollout server
        # until start() has its engine up. A probe that raised, or a daemon whose failure is
        # recorded (Daemon.failed), says "error": DOWN
        return "starting"
    if pid is None:
        return "starting" if launching else "DOWN"
    # starting: its port is not open yet. A port that accepts and does not answer (a timeout) is a
    # daemon that stopped answering, however long its process has lived: DOWN
    not_listening = "Connection refused" in str(details.get("error", ""))
    return "starting" if alive(pid) and not_listening else "DOWN"


def status(run_dir: str | Path) -> int:
    """Print one line per daemon (and the trainer's progress); 0 when every daemon is up. Before
    any daemon started (``preparing``), one line saying so."""
    info = load_job(run_dir)
    if info.get("state") == "starting":
        pid = preparing(Path(run_dir))
        print(f"{'job':<12} {'starting':<8} pid={pid}  {PREPARING}" if pid is not None else
              f"{'job':<12} {'DOWN':<8} pid={info.get('supervisor_pid')}  `areal-like run` is "
              "gone before it started a daemon")
        return 1
    ended = job_end(Path(run_dir), info)
    finished = ended is not None
    if finished:
        print(f"{'job':<12} {ended}")
    launching = alive(info.get("supervisor_pid"))
    all_ok = True
    for d in info["daemons"]:
        ok, details = health(d["health_url"])
        all_ok &= ok
        now = state(ok, details, d.get("pid"), finished, launching)
        # the launcher's record, else the daemon's own (a job started without run records none)
        pid = d.get("pid") or details.get("pid") or "-"
        print(f"{d['name']:<12} {now:<8} pid={pid}  {d['health_url']}  "
              f"{_detail(now, details, d.get('pid'))}")
    last = _last_step(Path(run_dir))
    if last:
        print(f"trainer step {last.get('step')}  "
              f"reward {last.get('reward_mean', float('nan')):.3f}  "
              f"staleness max {last.get('staleness_max')}")
    return 0 if all_ok else 1


def job_running(run_dir: Path) -> bool:
    """Whether a process of ``run_dir``'s job still holds its ``job.lock`` (taken and let go at
    once when none does)."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also lets go of the lock if this took it


def stop(run_dir: str | Path, timeout_s: float, poll_s: float = 0.2) -> int:
    """``areal-like stop``: SIGTERM to the job's ``areal-like run`` (as Ctrl-C), then wait until
    every process of the job has let go of ``job.lock``. 0 once stopped (or when none runs), 1 when
    it still runs after ``timeout_s``, 2 when ``run_dir`` is no run's."""
    run_dir = Path(run_dir)
    if not (run_dir / LOCK_FILE).is_file():
        print(f"error: {run_dir} is not a run directory (no {LOCK_FILE})", file=sys.stderr)
        return 2
    if not job_running(run_dir):
        print(f"no job is running in {run_dir}")
        return 0
    if (pid := launcher(run_dir)) is not None:
        os.kill(pid, signal.SIGTERM)
        print(f"stopping the job in {run_dir} (areal-like run pid {pid})", flush=True)
    else:  # it was killed; its daemons got SIGTERM from the kernel and are stopping
        print(f"waiting for the daemons of {run_dir} to stop (areal-like run is gone)", flush=True)
    deadline = time.monotonic() + timeout_s
    while job_running(run_dir):
        if time.monotonic() > deadline:
            print(f"error: the job in {run_dir} still runs after {timeout_s:g}s", file=sys.stderr)
            return 1
        time.sleep(poll_s)
    print("stopped")
    return 0


def _detail(now: str, details: dict, pid: int | None) -> str:
    """What ``status`` prints after a daemon's state: its uptime when it answers, else why not (a
    finished job's daemons are gone, as they should be: no error to show)."""
    if now == "finished":
        return ""
    if "uptime_s" in details:  # it answers; a recorded failure's kind too (Daemon.failed), and
        # a buffer on a full disk why it refuses groups while it hands out batches (buffer/WAL.md)
        return " ".join([f"uptime {details['uptime_s']}s",
                         *([f"error: {details['error']}"] if "error" in details else []),
                         *([f"refusing new groups: {details['degraded']}"]
                           if "degraded" in details else [])])
    if now == "starting" and pid is None:
        return "not started yet"
    return details.get("error", "")


def _last_step(run_dir: Path) -> dict | None:
    return next((r for r in reversed(read_jsonl(trainer_jsonl(run_dir))) if "step" in r), None)


def snapshot(info: dict) -> dict[str, dict[str, float] | None]:
    from areal_like.net.metrics import scrape

    out: dict[str, dict[str, float] | None] = {}
    for d in info["daemons"]:
        try:
            out[d["name"]] = scrape(d["metrics_url"])
        except urllib.error.HTTPError as e:
            if e.code == 401:  # every scrape would be refused: nothing to show, say why once
                raise SystemExit(f"error: {d['metrics_url']} answered 401: the job's /metrics "
                                 f"need its token; set {METRICS_TOKEN_ENV} to it") from None
            out[d["name"]] = None
        except Exception:
            out[d["name"]] = None
    return out


def figure(values: dict[str, float], prev: dict[str, float] | None, dt: float, series: str,
           how: str) -> str:
    if how == "value":
        v = values.get(series)
    elif how == "ratio":  # the change of one counter over the change of another since prev
        num, den = series.split("/")
        before = prev or {}
        d_den = values.get(den, 0.0) - before.get(den, 0.0)
        v = (values.get(num, 0.0) - before.get(num, 0.0)) / d_den if d_den > 0 else None
    elif how == "rate":
        v = None
        if prev is not None and series in values and series in prev and dt > 0:
            v = (values[series] - prev[series]) / dt
    else:
        n = values.get(f"{series}_count", 0.0)
        v = values.get(f"{series}_sum", 0.0) / n if n else None
    if v is None:
        return "-"
    return f"{v:.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.3g}"


# how ``top`` shows a daemon's state (``state``) where its /metrics did not answer
STATE_STYLE = {"up": "green", "starting": "yellow", "finished": "blue", "DOWN": "red"}


def render(info: dict, snap: dict, prev: dict, dt: float, states: dict[str, str] | None = None):
    """One table per kind; a daemon without a snapshot shows its ``states`` entry (default
    DOWN)."""
    from rich.table import Table

    tables = []
    for kind in ("buffer", "rollout", "trainer"):
        cols = [(title, series, how) for title, k, series, how in COLUMNS if k == kind]
        table = Table(title=kind, title_justify="left", expand=True)
        table.add_column("daemon")
        table.add_column("up")
        for title, _, _ in cols:
            table.add_column(title, justify="right")
        for d in (d for d in info["daemons"] if d["kind"] == kind):
            values = snap.get(d["name"])
            if values is None:
                now = (states or {}).get(d["name"], "DOWN")
                table.add_row(d["name"], f"[{STATE_STYLE.get(now, 'red')}]{now}",
                              *["-"] * len(cols))
                continue
            table.add_row(d["name"], "[green]ok",
                          *[figure(values, prev.get(d["name"]), dt, s, h) for _, s, h in cols])
        tables.append(table)
    return tables


def down_states(info: dict, snap: dict, finished: bool) -> dict[str, str]:
    """``status``'s word (``state``) for every daemon without a snapshot: its /health is asked,
    unless the job finished."""
    launching = alive(info.get("supervisor_pid"))
    out = {}
    for d in info["daemons"]:
        if snap.get(d["name"]) is None:
            ok, details = (False, {}) if finished else health(d["health_url"])
            out[d["name"]] = state(ok, details, d.get("pid"), finished, launching)
    return out


def _head(run_dir: str | Path, ended: str | None = None) -> str:
    """``top``'s first line; ``ended``: how the job ended (``job_end``)."""
    last = _last_step(Path(run_dir)) or {}
    return (f"{run_dir}   trainer step {last.get('step', '-')}   "
            f"reward {last.get('reward_mean', float('nan')):.3f}   {time.strftime('%H:%M:%S')}"
            + (f"   job {ended}" if ended is not None else ""))


def live(run_dir: str | Path, interval_s: float = 2.0, once: bool = False) -> int:
    """``areal-like top``: a live view on a terminal; without one (or ``once``) a plain table per
    interval, the first after one interval so that rates have two points (``once``: then exit).
    Once the job has ended (``job_end``) one last view saying how, and exit 0."""
    from rich.console import Console, Group
    from rich.live import Live
    from rich.text import Text

    plain = once or not sys.stdout.isatty()
    console = Console(file=sys.stdout, force_terminal=False, color_system=None, width=160)

    def show(head: str, *tables) -> None:
        if plain:
            console.print(head, *tables)
            sys.stdout.flush()
        else:
            view.update(Group(Text(head), *tables))

    try:
        with (contextlib.nullcontext() if plain
              else Live(refresh_per_second=4, screen=False)) as view:
            return _watch(run_dir, show, plain, interval_s, once)
    except KeyboardInterrupt:
        return 0


def _watch(run_dir: str | Path, show, plain: bool, interval_s: float, once: bool) -> int:
    """``live``'s loop: ``show(head, *tables)`` per refresh; its exit code."""
    while (pid := preparing(Path(run_dir))) is not None:
        show(f"{run_dir}   starting: {PREPARING} (areal-like run pid={pid})   "
             f"{time.strftime('%H:%M:%S')}")
        if once:
            return 1
        time.sleep(interval_s)
    if (info := load_job(run_dir)).get("state") == "starting":  # its launcher is gone
        show(f"{run_dir}   DOWN: `areal-like run` (pid={info.get('supervisor_pid')}) is gone "
             "before it started a daemon")
        return 1
    finished = job_end(Path(run_dir), info) is not None
    prev, t_prev = (snapshot(info) if plain and not finished else {}), time.monotonic()
    while True:
        if plain and not finished:
            time.sleep(interval_s)
        ended = job_end(Path(run_dir), info)
        finished = ended is not None
        # a finished job's daemons are gone: nothing to scrape (its ports may serve another job)
        snap, now = ({} if finished else snapshot(info)), time.monotonic()
        show(_head(run_dir, ended),
             *render(info, snap, prev, now - t_prev, down_states(info, snap, finished)))
        if finished:
            return 0
        if once:  # like `status`: a script learns from the exit code that nothing answered
            return 0 if any(v is not None for v in snap.values()) else 1
        prev, t_prev = {k: v for k, v in snap.items() if v is not None}, now
        if not plain:
            time.sleep(interval_s)
        info = load_job(run_dir)  # PIDs change on restarts, and the job ends
        if info.get("state") == "starting":  # started again (a resume): its daemons are to come
            return _watch(run_dir, show, plain, interval_s, once)
