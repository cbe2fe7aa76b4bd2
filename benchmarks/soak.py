"""Soak run: a real `areal-like run` with time compressed, watched for growth.

Starts ``python -m launch.cli run experiment=quickstart`` (the quickstart's tiny model and task)
with settings that make a week of bookkeeping happen in minutes: unbounded trainer steps (the
script stops the job), a checkpoint every ``--checkpoint-every`` versions with
``trainer.keep_checkpoints=2``, an export every ``--export-every`` versions with ``export.keep=2``,
WAL segments of ``--segment-mb`` (16 MiB), logs and ``metrics/scrape.jsonl`` rotated past
``--log-max-mb``, no evaluation. Every ``--sample-s`` seconds it records, for every process of
the job (the supervisor, each daemon named in ``<run_dir>/ports.json`` and every descendant of a
daemon: reward workers, torchrun's ranks), its RSS (``VmRSS`` in /proc/PID/status), open files
(entries of /proc/PID/fd) and threads, and the run directory's apparent size per entry
(``checkpoints/``, ``export/``, ``wal/``, ``tracking/``, ``samples.jsonl``, ...; ``logs/`` and
``metrics/`` per file, a rotated ``name.N`` counted with ``name``; what is written once at start
as ``other``), plus the trainer's latest policy version. Samples go to
``--samples`` (JSONL, one line per sample).

At the end it prints one JSON line per case (the benchmarks' convention: ``name``, ``figure``,
``unit``, ``baseline``, ``ratio``, ``goal``, ``warning`` when the machine was loaded):

Every ``ratio`` is higher-is-better (baseline / figure where a smaller figure is better):

* ``soak_rss/<proc>``: RSS at the end (mean of the last window) against RSS right after warm-up
  (mean of the first window after it); ratio = baseline / figure, goal ratio >= 0.91 (growth
  within 10%).
* ``soak_rss_week/<proc>``: the ratio alone misses a large leak in a short run (10% of 400 MB is
  40 MB, a week's leak of 2 KB a version), so the least-squares RSS slope per version after
  warm-up is extrapolated to a week of a GPU job's steps (7 x 2,880 = 20,160 versions: the
  soak's clock is its versions, compressed; its seconds are not) as ``figure`` (MB), against
  ``RSS_WEEK_BUDGET_MB`` (64 MB a process) as ``baseline``; ratio = baseline / figure (a figure
  under 0.1 MB, or a shrinking RSS, counts as 0.1 MB), goal ratio >= 1.
* ``soak_fds/<proc>``: the same windows for open files, with an absolute goal: ``growth`` (end
  minus baseline) <= ``FD_GROWTH_MAX`` (2; a ratio of 0.91 would let 50 files leak 5).
* ``soak_disk/<entry>``: KB the entry grows per 1,000 versions after warm-up (least squares). The
  goal follows the README's "Long runs: disk use" table: an entry held by retention
  (``checkpoints``, ``export``, ``wal``) has ``ratio`` = its median size in the first half of
  the post-warm-up samples over the median in the second half, goal >= 0.91 (``max_kb``: the
  largest, e.g. a checkpoint written before the oldest is deleted); a rotated one
  (``logs/<daemon>.log``, ``metrics/scrape.jsonl``) its bound log_max_mb x (log_backups + 1)
  over its largest size ever, goal >= 1; one with no bound (``metrics/trainer.jsonl``,
  ``tracking``, ``samples.jsonl``) its growth per day at a GPU job's 2,880 steps a day.

**Warm-up** is the first ``--warmup-frac`` (default 0.25) of the time between the first sample
that sees a trained version and the last sample; the "window" of a figure is ``--window-frac``
(0.10) of that same span. Every process the script starts is stopped by PID (SIGTERM to the
``areal-like run`` process, which stops its daemons in reverse order, then SIGKILL to any PID it
recorded that is still alive with the same start time); the run directory is removed unless
``--keep``.

    nice -n 19 python benchmarks/soak.py --minutes 45 --samples soak_samples.jsonl > soak.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from transport_report import at_least, number_in  # noqa: E402

GPU_STEPS_PER_DAY = 2880  # the README's GPU example: one step every 30 s
# The README's table ("Long runs: disk use"): entries held by retention, entries rotated past
# launch.log_max_mb into launch.log_backups files, entries with no bound.
RETAINED = ("checkpoints", "export", "wal")
ROTATED = ("logs/", "metrics/scrape.jsonl")
PER_FILE = ("logs", "metrics")  # entries sized per file (rotated backups with their file)
GROWING = (*RETAINED, *PER_FILE, "tracking", "samples.jsonl", "eval.jsonl", "learning_curve.png",
           "summary.json")
GOAL_RATIO = round(1 / 1.10, 2)  # baseline / figure: at most 10% growth
LOG_BACKUPS = 2
PROC_FIGURES = (("rss", "rss_kb", 1024, "MB"), ("fds", "fds", 1, "open files"))
WEEK_VERSIONS = 7 * GPU_STEPS_PER_DAY
# A process may grow at most this much in WEEK_VERSIONS: the buffer's dedupe ids are bounded
# (SEEN_KEEP in buffer/service.py: 400,000 ids of about 130 bytes, ~52 MB) and fit in it.
RSS_WEEK_BUDGET_MB = 64
FD_GROWTH_MAX = 2  # open files: end minus baseline (the means of their windows)


# ---------------------------------------------------------------- sampling (pure where it can be)
def proc_status(pid: int) -> dict | None:
    """RSS (KB), open fds and threads of one process from /proc; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return {"pid": pid, "rss_kb": int(fields.get("VmRSS", "0 kB").split()[0]), "fds": fds,
            "threads": int(fields.get("Threads", "0").strip())}


def entry_key(rel: Path) -> str:
    """The disk entry a path under the run directory counts in: its top-level name, for ``logs/``
    and ``metrics/`` the file with any rotation suffix (``trainer.log.2``) dropped, and ``other``
    for what the job writes once at start (config, keys, ports, lock, sockets)."""
    parts = rel.parts
    if len(parts) >= 2 and parts[0] in PER_FILE:
        name = parts[1]
        stem, _, suffix = name.rpartition(".")
        return f"{parts[0]}/{stem if suffix.isdigit() and stem else name}"
    return parts[0] if parts[0] in GROWING else "other"


def disk_usage(run_dir: Path) -> dict[str, int]:
    """Apparent bytes per entry (``entry_key``) of the run directory; files vanishing meanwhile
    (rotation, retention) are skipped."""
    out: dict[str, int] = {}
    for dirpath, _dirs, files in os.walk(run_dir):
        for name in files:
            path = Path(dirpath) / name
            try:
                size = path.lstat().st_size
            except FileNotFoundError:
                continue
            key = entry_key(path.relative_to(run_dir))
            out[key] = out.get(key, 0) + size
    return out


def last_version(jsonl: Path, tail_bytes: int = 8192) -> int | None:
    """The policy version of the trainer's last complete record (reads only the file's tail)."""
    try:
        with open(jsonl, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return None
    for line in reversed(lines[1:] if len(lines) > 1 else lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        v = rec.get("policy_version", rec.get("step"))
        if isinstance(v, int):
            return v
    return None


def job_processes(run_dir: Path, cli_pid: int) -> dict[str, int]:
    """name -> PID of every process of the job: ``supervisor``, each daemon of ports.json, and each
    descendant of a daemon as ``<daemon>/<comm>-<k>`` (k in start order)."""
    import psutil

    out = {"supervisor": cli_pid}
    try:
        daemons = json.loads((run_dir / "ports.json").read_text())["daemons"]
    except (FileNotFoundError, ValueError, KeyError):
        return out
    for d in daemons:
        if not d.get("pid"):
            continue
        out[d["name"]] = d["pid"]
        try:
            kids = psutil.Process(d["pid"]).children(recursive=True)
            kids = sorted(kids, key=lambda p: (p.create_time(), p.pid))
            names = [(k.pid, k.name()) for k in kids]
        except psutil.Error:
            continue
        seen: dict[str, int] = {}
        for pid, comm in names:
            seen[comm] = seen.get(comm, 0) + 1
            out[f"{d['name']}/{comm}-{seen[comm]}"] = pid
    return out


def take_sample(run_dir: Path, cli_pid: int, t0: float) -> dict:
    procs = {}
    for name, pid in job_processes(run_dir, cli_pid).items():
        st = proc_status(pid)
        if st is not None:
            procs[name] = st
    version = last_version(run_dir / "metrics" / "trainer.jsonl")
    return {"t": round(time.time() - t0, 1), "version": version,
            "load": round(os.getloadavg()[0], 2), "procs": procs, "disk": disk_usage(run_dir)}


# ---------------------------------------------------------------- the flatness summary (pure)
def phases(samples: list[dict], warmup_frac: float, window_frac: float) -> dict:
    """Times (s) that split the run: ``start`` (the first sample with a trained version), ``warm``
    (``start`` + warmup_frac of the span to the last sample), ``end`` (the last sample), ``window``
    (window_frac of the span) and ``mid`` (halfway from ``start`` to ``end``)."""
    trained = [s["t"] for s in samples if s.get("version") is not None]
    if len(trained) < 2:
        raise ValueError("fewer than 2 samples with a trained version: nothing to summarize")
    start, end = trained[0], trained[-1]
    span = end - start
    return {"start": start, "warm": start + warmup_frac * span, "end": end,
            "window": max(window_frac * span, 1e-9), "mid": start + span / 2}


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys on xs (0 when xs do not vary)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _median(xs: list[float]) -> float:
    """The median (0 for none): a checkpoint caught while written beside the ones kept is one
    sample, not a trend."""
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2 if xs else 0


def _at(series: list[tuple[float, float]], t: float) -> float:
    """The value of the sample nearest to time t."""
    return min(series, key=lambda p: abs(p[0] - t))[1]


def proc_case(kind: str, name: str, series: list[tuple[float, int, float]], ph: dict,
              scale: float, unit: str) -> dict:
    """One process's ``soak_rss`` or ``soak_fds`` line from (t, version, value) samples."""
    post = [(t, v, y) for t, v, y in series if t >= ph["warm"]]
    warm = [y for t, _, y in post if t <= ph["warm"] + ph["window"]]
    end = [y for t, _, y in post if t >= ph["end"] - ph["window"]]
    base = _mean(warm) / scale if warm else None
    fig = _mean(end) / scale if end else None
    pts = [(t, y) for t, _, y in series]
    per_k = slope([v for _, v, _ in post if v is not None],
                  [y for _, v, y in post if v is not None]) * 1000 / scale
    case = {"name": f"soak_{kind}/{name}", "figure": None if fig is None else round(fig, 2),
            "unit": unit, "baseline": None if base is None else round(base, 2),
            "ratio": round(base / fig, 3) if fig and base is not None else None,
            "goal": f"ratio >= {GOAL_RATIO} (flat after warm-up)",
            "start": round(_at(pts, ph["start"]) / scale, 2),
            "middle": round(_at(pts, ph["mid"]) / scale, 2),
            "end": round(_at(pts, ph["end"]) / scale, 2),
            "per_1000_versions": round(per_k, 3)}
    if kind == "fds":
        case["goal"] = f"growth <= {FD_GROWTH_MAX} open files (end - baseline)"
        case["growth"] = None if None in (fig, base) else round(fig - base, 2)
    return case


def week_case(name: str, per_1000_versions_mb: float) -> dict:
    """One process's ``soak_rss_week`` line: its RSS slope per 1,000 versions (MB) extrapolated
    to WEEK_VERSIONS against RSS_WEEK_BUDGET_MB; under 0.1 MB (the figure's resolution, or a
    shrinking RSS) counts as 0.1."""
    week = per_1000_versions_mb * WEEK_VERSIONS / 1000
    return {"name": f"soak_rss_week/{name}", "figure": round(week, 1),
            "unit": f"MB in 7 days ({WEEK_VERSIONS} versions)", "baseline": RSS_WEEK_BUDGET_MB,
            "ratio": round(RSS_WEEK_BUDGET_MB / max(week, 0.1), 3),
            "goal": "ratio >= 1 (least-squares RSS slope after warm-up, a week at 2,880 steps "
                    "a day)"}


def disk_case(entry: str, series: list[tuple[float, int | None, int]], ph: dict,
              rotate_bytes: float | None = None) -> dict:
    """One run-directory entry's ``soak_disk`` line from (t, version, bytes) samples: growth per
    1,000 versions after warm-up as the figure; ``ratio`` = its median size in the first half of
    the post-warm-up samples over the median in the second half (goal for a retained entry); for a
    rotated one (``rotate_bytes`` = launch.log_max_mb in bytes) the bound rotate_bytes x
    (log_backups + 1) (``rotate_bytes`` already multiplied) over its largest size; otherwise no goal
    but the growth per day at a GPU job's step rate."""
    post = [(t, v, y) for t, v, y in series if t >= ph["warm"] and v is not None]
    half = (ph["warm"] + ph["end"]) / 2
    first = _median([y for t, _, y in post if t < half])
    second = _median([y for t, _, y in post if t >= half])
    per_k = slope([v for _, v, _ in post], [y for _, _, y in post]) * 1000
    case = {"name": f"soak_disk/{entry}", "figure": round(per_k / 1024, 2),
            "unit": "KB per 1000 versions", "baseline": round(first / 1024, 1),
            "ratio": round(first / second, 3) if second else None}
    if entry.startswith(RETAINED):
        case["goal"] = f"retained: ratio >= {GOAL_RATIO} (flat after warm-up)"
        case["max_kb"] = round(max(y for _, _, y in series) / 1024, 1)
    elif entry.startswith(ROTATED) and rotate_bytes:
        top = max(y for _, _, y in series)
        case.update(baseline=round(rotate_bytes / 1024, 1),
                    ratio=round(rotate_bytes / max(top, 1), 3),
                    goal="rotated: ratio = bound / largest size >= 1", max_kb=round(top / 1024, 1))
    else:
        case["goal"] = "no bound (README): growth per day at 2,880 steps a day"
        case["gpu_mb_per_day"] = round(max(per_k, 0) / 1000 * GPU_STEPS_PER_DAY / 2**20, 2)
    pts = [(t, y) for t, _, y in series]
    for key, at in (("start_kb", "start"), ("middle_kb", "mid"), ("end_kb", "end")):
        case[key] = round(_at(pts, ph[at]) / 1024, 1)
    return case


def summarize(samples: list[dict], warmup_frac: float = 0.25, window_frac: float = 0.10,
              cores: int | None = None, rotate_bytes: float | None = None) -> list[dict]:
    """Every ``soak_*`` line for a list of samples (as ``take_sample`` writes them), ``soak_run``
    (duration and versions) first; ``rotate_bytes``: the bound of a rotated file (``disk_case``)."""
    ph = phases(samples, warmup_frac, window_frac)
    live = [s for s in samples if ph["start"] <= s["t"] <= ph["end"]]
    names = sorted({n for s in live for n in s["procs"]})
    entries = sorted({e for s in live for e in s["disk"]})
    cores = cores or os.cpu_count() or 1
    loads = [s["load"] for s in samples if "load" in s]
    v0, v1 = live[0]["version"], live[-1]["version"]
    minutes = (ph["end"] - ph["start"]) / 60
    out = [{"name": "soak_run", "figure": round(minutes, 1), "unit": "minutes",
            "baseline": None, "ratio": None, "goal": "40+ minutes, thousands of versions",
            "versions": v1 - v0, "first_version": v0, "last_version": v1,
            "versions_per_min": round((v1 - v0) / minutes, 1) if minutes else None,
            "warmup_end_s": round(ph["warm"], 1), "samples": len(live)}]
    for name in names:
        rows = [(s["t"], s["version"], s["procs"][name]) for s in live if name in s["procs"]]
        pids = len({r["pid"] for _, _, r in rows})
        for kind, key, scale, unit in PROC_FIGURES:
            case = proc_case(kind, name, [(t, v, r[key]) for t, v, r in rows], ph, scale, unit)
            out.append({**case, "pids": pids})
            if kind == "rss":
                out.append({**week_case(name, case["per_1000_versions"]), "pids": pids})
    for entry in entries:
        series = [(s["t"], s["version"], s["disk"].get(entry, 0)) for s in live]
        out.append(disk_case(entry, series, ph, rotate_bytes))
    if loads and max(loads) > cores:
        for case in out:
            case["warning"] = f"loaded machine: load average up to {max(loads)} on {cores} cores"
    return out


# ---------------------------------------------------------------- the job
def overrides(run_dir: Path, args: argparse.Namespace) -> list[str]:
    """The quickstart with time compressed: endless steps, frequent retained checkpoints and
    exports, small WAL segments and rotation limits, no evaluation, no restarts (a crash ends the
    soak instead of hiding in it)."""
    return ["experiment=quickstart", f"run_dir={run_dir}", "trainer.steps=100000000",
            f"trainer.checkpoint_every={args.checkpoint_every}", "trainer.keep_checkpoints=2",
            f"export.every={args.export_every}", "export.keep=2", "export.at_end=false",
            "eval.at_end=false", "eval.every=0",
            f"buffer.segment_bytes={int(args.segment_mb * 2**20)}",
            f"launch.log_max_mb={args.log_max_mb}", f"launch.log_backups={LOG_BACKUPS}",
            "launch.restarts=0"]


def stop_job(cli: subprocess.Popen, seen: dict[int, float], grace_s: float = 120.0) -> None:
    """SIGTERM to ``areal-like run`` (it stops its daemons in reverse order by PID), then SIGKILL
    to every PID this script recorded that is still alive with the start time it had."""
    import psutil

    if cli.poll() is None:
        cli.send_signal(signal.SIGTERM)
        try:
            cli.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            cli.kill()
            cli.wait()
    for pid, created in seen.items():
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) < 0.01:
                proc.kill()
        except psutil.Error:
            pass


def remember(seen: dict[int, float], sample: dict) -> None:
    """Add the sample's PIDs with their start times (PID reuse must not get a stranger killed)."""
    import psutil

    for st in sample["procs"].values():
        if st["pid"] not in seen:
            try:
                seen[st["pid"]] = psutil.Process(st["pid"]).create_time()
            except psutil.Error:
                pass


def soak(root: Path, args: argparse.Namespace) -> list[dict]:
    """Run the job for ``args.minutes``, sampling every ``args.sample_s``; the samples."""
    run_dir = root / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    argv = [sys.executable, "-m", "launch.cli", "run", "-q", *overrides(run_dir, args)]
    samples: list[dict] = []
    seen: dict[int, float] = {}
    t0 = time.time()
    with open(root / "cli.log", "wb") as log, open(args.samples, "w") as out:
        config = {"argv": argv[2:], "log_max_mb": args.log_max_mb, "log_backups": LOG_BACKUPS,
                  "segment_mb": args.segment_mb}
        out.write(json.dumps({"config": config}) + "\n")
        cli = subprocess.Popen(argv, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
        try:
            import psutil

            seen[cli.pid] = psutil.Process(cli.pid).create_time()
            deadline = t0 + args.minutes * 60
            while time.time() < deadline and cli.poll() is None:
                sample = take_sample(run_dir, cli.pid, t0)
                remember(seen, sample)
                samples.append(sample)
                out.write(json.dumps(sample) + "\n")
                out.flush()
                try:
                    cli.wait(timeout=max(0.0, min(args.sample_s, deadline - time.time())))
                except subprocess.TimeoutExpired:
                    pass
        except KeyboardInterrupt:  # SIGINT or SIGTERM: stop early, summarize what ran
            pass
        finally:
            rc = cli.poll()
            stop_job(cli, seen)
    if rc is not None:
        tail = (root / "cli.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"the job ended by itself (rc {rc}) after {time.time() - t0:.0f} s:\n"
                         f"{tail}")
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=number_in(0), default=45.0, help="how long the job runs")
    ap.add_argument("--sample-s", type=number_in(0), default=15.0, help="seconds between samples")
    ap.add_argument("--checkpoint-every", type=at_least(1), default=50)
    ap.add_argument("--export-every", type=at_least(0), default=200)
    ap.add_argument("--segment-mb", type=number_in(0), default=16.0,
                    help="buffer.segment_bytes in MiB: small, so that WAL segments rotate within "
                         "the run, yet above the dedupe ids each rotation's control record holds")
    ap.add_argument("--log-max-mb", type=number_in(0), default=0.05,
                    help="launch.log_max_mb: small, so that logs and scrapes rotate within the run")
    ap.add_argument("--warmup-frac", type=number_in(0, 1, low_ok=True), default=0.25)
    ap.add_argument("--window-frac", type=number_in(0, 1), default=0.10)
    ap.add_argument("--samples", default="soak_samples.jsonl", help="JSONL of every sample")
    ap.add_argument("--from-samples", help="only summarize this samples file (no run)")
    ap.add_argument("--root", help="directory for the run (default: a new temporary one)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the run directory (ROOT/run; a temporary ROOT goes whole)")
    args = ap.parse_args()
    # SIGINT is ignored in a shell's background job: both signals end the soak early, cleanly
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.from_samples:
        rows = [json.loads(line) for line in open(args.from_samples) if line.strip()]
        samples = [r for r in rows if "t" in r]
        config = next((r["config"] for r in rows if "config" in r), {})
        args.log_max_mb = config.get("log_max_mb", args.log_max_mb)
    else:
        root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="soak-"))
        root.mkdir(parents=True, exist_ok=True)
        try:
            samples = soak(root.resolve(), args)
        finally:
            if not args.keep:  # what the soak made: a --root given may hold other things
                shutil.rmtree(root / "run" if args.root else root, ignore_errors=True)
    rotate_bytes = int(args.log_max_mb * 2**20) * (LOG_BACKUPS + 1)
    try:
        cases = summarize(samples, args.warmup_frac, args.window_frac, rotate_bytes=rotate_bytes)
    except ValueError as e:  # e.g. a --minutes too short for the job to train past its start
        raise SystemExit(f"soak: {e}") from None
    for case in cases:
        print(json.dumps(case), flush=True)


if __name__ == "__main__":
    main()
