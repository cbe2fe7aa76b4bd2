"""The tracker sink: tails a run's JSONL files into its trackers (``launch/tracking.py``):
``metrics/trainer.jsonl`` -> ``train/<key>`` at ``step``, ``eval.jsonl`` -> ``eval/<key>`` at
``policy_version``, ``samples.jsonl`` -> one ``samples`` table per trainer step.

Invariants:
- only complete lines are read (the final poll also takes a last unterminated one); each file is
  read from where the previous poll stopped, and again from its start when it shrank;
- nested dicts become "a/b" keys; only numbers are scalars;
- a table goes out whole: held until a later step's row, an unchanged file or the final poll;
- a tracker that raises is closed and dropped with one warning: the others, and the job, go on;
- a tracker that continues its run (``Tracker.run_id``: wandb, mlflow, trackio) gets no row it
  got before a resume (an x at or below its ``resumed`` mark: the files are read from their start
  at every start), and ``tracking/runs.json`` keeps its run and marks for the next start.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from areal_like.settings.schema import RunConfig
from launch.local import write_json_atomic
from launch.tracking import RUNS_FILE, Tracker, build_trackers, flatten, saved_runs

log = logging.getLogger("launch.track_sink")

FOLLOW_POLL_S = 2.0  # `areal-like track`: how often the files are read


class JsonlTail:
    """Incremental reader of one JSONL file that other processes append to."""

    def __init__(self, path: str | Path, since: int = 0):
        self.path = Path(path)
        # bytes consumed, partial line included (``since``: skipped, a line boundary)
        self.offset = since
        self.partial = b""  # the bytes after the last newline

    def read(self, final: bool = False) -> list[dict]:
        """The JSON objects of the lines completed since the last call (``final``: and a last
        unterminated line)."""
        try:
            with self.path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self.offset:
                    log.warning("%s shrank: reading it again from the start", self.path)
                    self.offset, self.partial = 0, b""
                f.seek(self.offset)
                data = f.read(size - self.offset)
        except FileNotFoundError:
            data = b""
        except OSError as e:
            log.warning("cannot read %s: %s", self.path, e)
            return []
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        if final and self.partial.strip():
            lines.append(self.partial)
            self.partial = b""
        rows = []
        for line in lines:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:  # JSONDecodeError and UnicodeDecodeError
                log.warning("%s: skipping a line that is not JSON: %.80r", self.path, line)
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def scalars(row: dict, prefix: str, drop: tuple[str, ...] = ()) -> dict[str, float]:
    """``prefix/<flattened key>`` -> float for every numeric leaf of ``row`` outside ``drop``."""
    flat = flatten({k: v for k, v in row.items() if k not in drop})
    return {f"{prefix}/{k}": float(v) for k, v in flat.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TrackerSink:
    """``poll()`` forwards what the run's files gained since the last poll; ``close()`` the
    trackers."""

    def __init__(self, run_dir: str | Path, trackers: list[Tracker]):
        run_dir = Path(run_dir)
        self.trackers = list(trackers)
        self.train = JsonlTail(run_dir / "metrics" / "trainer.jsonl")
        self.eval = JsonlTail(run_dir / "eval.jsonl")
        self.samples = JsonlTail(run_dir / "samples.jsonl")
        self.pending: list[dict] = []  # sample rows of tables not known to be complete yet
        self.out = run_dir / "tracking"
        # per tracker: the last x sent of each series (the marks runs.json keeps)
        self.marks = {id(t): dict(t.resumed) for t in self.trackers}

    @classmethod
    def from_config(cls, cfg: RunConfig, run_dir: str | Path | None = None) -> TrackerSink:
        return cls(run_dir if run_dir is not None else cfg.run_dir, build_trackers(cfg, run_dir))

    def poll(self, final: bool = False) -> int:
        """Forward every new complete row; ``final`` when the writers have stopped. Returns how many
        scalar rows and tables went out."""
        sent = 0
        for tail, series, x in ((self.train, "train", "step"),
                                (self.eval, "eval", "policy_version")):
            for row in tail.read(final):
                metrics = scalars(row, series, (x, "time"))
                if _is_int(row.get(x)) and metrics:  # other rows (e.g. the resume event) have no x
                    self._send(series, row[x], "log_metrics", metrics, row[x])
                    sent += 1
        sent += self._tables(final)
        if sent:
            self._save_runs()
        return sent

    def _tables(self, final: bool) -> int:
        new = self.samples.read(final)
        self.pending += [r for r in new if _is_int(r.get("step"))]
        settled = final or (not new and not self.samples.partial)
        sent = 0
        while self.pending:
            step = self.pending[0]["step"]
            n = next((i for i, r in enumerate(self.pending) if r["step"] != step),
                     len(self.pending))
            if n == len(self.pending) and not settled:
                break  # the newest table may still be growing
            table, self.pending = self.pending[:n], self.pending[n:]
            self._send("samples", step, "log_table", "samples", table, step)
            sent += 1
        return sent

    def _send(self, series: str, x: int, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            if x <= tracker.resumed.get(series, -1):
                continue  # its run got it before the resume
            try:
                getattr(tracker, method)(*args)
                marks = self.marks[id(tracker)]
                marks[series] = max(x, marks.get(series, x))
            except Exception as e:  # a tracker is an observer: its failure must not end the job
                log.warning("tracker %s failed (%s: %s); it gets no more data",
                            type(tracker).__name__, type(e).__name__, e)
                self.trackers.remove(tracker)
                self._close(tracker)

    def _save_runs(self) -> None:
        """``tracking/runs.json``: the run and marks of every tracker that continues its run,
        beside those of trackers this sink does not feed (``areal-like track 'tracker=[wandb]'``
        of a run whose own sink fed others)."""
        runs = saved_runs(self.out)
        runs.update({t.name: {"id": t.run_id, **self.marks[id(t)]}
                     for t in self.trackers if t.run_id is not None})
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out / RUNS_FILE, runs)
        except OSError as e:  # a full disk: the next poll tries again
            log.warning("cannot write %s: %s", self.out / RUNS_FILE, e)

    @staticmethod
    def _close(tracker: Tracker) -> None:
        try:
            tracker.close()
        except Exception as e:
            log.warning("tracker %s failed to close: %s", type(tracker).__name__, e)

    def close(self) -> None:
        for tracker in self.trackers:
            self._close(tracker)
        self.trackers = []


def follow(sink: TrackerSink, over: Callable[[], bool], stop: threading.Event,
           poll_s: float = FOLLOW_POLL_S) -> int:
    """Poll until the job is ``over()`` (``launch.records.job_over``) or ``stop`` is set, then a
    final poll; the rows and tables sent. Does not close the sink."""
    sent = 0
    while not stop.is_set() and not over():
        sent += sink.poll()
        stop.wait(poll_s)
    return sent + sink.poll(final=True)
