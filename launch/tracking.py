"""Experiment trackers: sinks for a run's metrics and sample tables (``cfg.tracker``).

A tracker never runs inside a daemon: ``launch.track_sink`` tails the run's JSONL files into them
(from ``areal-like run`` or ``areal-like track``), so a slow or failing backend cannot stop
training. Every backend writes under ``<run_dir>/tracking/`` and works offline: ``jsonl``
(``metrics.jsonl``), ``tensorboard``, ``wandb`` (``mode=tracking.wandb_mode``; ``wandb sync``
uploads later), ``mlflow`` (a file store; MLflow 3 needs ``MLFLOW_ALLOW_FILE_STORE=true``, which
is set) and ``trackio`` (``TRACKIO_DIR`` wins when set). A backend's package is imported only when
it is built; ``check_trackers`` names a missing one before anything starts. ``train/*`` goes at
the trainer step and ``eval/*`` at the policy version, so steps may arrive out of order. A
resumed job continues each run it had (``RUNS_FILE``): wandb by id, MLflow by run id, trackio by
name; TensorBoard's and the JSONL file are rewritten from the run's files at every start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from areal_like.settings.schema import ConfigError, RunConfig
from launch.local import read_json

# tracker -> (importable modules, any one of which is enough; the pip extra that installs one)
TRACKER_MODULES: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"),
    "trackio": (("trackio",), "trackio"),
}


# where the sink keeps, per tracker that continues its run on a resume (wandb, mlflow, trackio), its
# run's id and the last x it sent of each series: ``{name: {"id": ..., "train": step, ...}}``
RUNS_FILE = "runs.json"


class Tracker(ABC):
    """Where scalars and tables go. ``metrics`` keys are "a/b" paths; ``step`` is the x value.
    ``run_id``: the run a later start continues (None: each start writes its own, as TensorBoard's
    and the JSONL file's rewrite); ``resumed``: the last x of each series the run got before."""

    name = ""  # its key in ``cfg.tracker`` and runs.json
    run_id: str | None = None
    resumed: dict[str, int] = {}

    @abstractmethod
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    @abstractmethod
    def log_table(self, name: str, rows: list[dict], step: int) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


def check_trackers(cfg: RunConfig) -> list[str]:
    """One line per configured tracker whose package is not installed (the preflight's check)."""
    out = []
    for name in cfg.tracker:
        modules, extra = TRACKER_MODULES.get(name, ((), ""))  # jsonl: no package
        if modules and not any(importlib.util.find_spec(m) is not None for m in modules):
            out.append(f"tracker={name!r} needs the {' or '.join(map(repr, modules))} package, "
                       "which is not installed: "
                       f"pip install -e '.[{extra}]' in the checkout (or drop {name!r} from "
                       "tracker)")
    return out


def build_trackers(cfg: RunConfig, run_dir: str | Path | None = None) -> list[Tracker]:
    """One tracker per entry of ``cfg.tracker``, writing under ``<run_dir>/tracking``."""
    if missing := check_trackers(cfg):
        raise ConfigError("\n".join(missing))
    run_dir = Path(run_dir if run_dir is not None else cfg.run_dir).resolve()
    out = run_dir / "tracking"
    project, name = cfg.tracking.project, cfg.tracking.run_name or run_dir.name
    config = dataclasses.asdict(cfg)
    runs = saved_runs(out)  # the runs a previous start of this run_dir wrote: continued

    def run_id(tracker: str) -> str | None:
        return runs.get(tracker, {}).get("id")

    builders = {
        "jsonl": lambda: JsonlTracker(out / "metrics.jsonl"),
        "tensorboard": lambda: TensorBoardTracker(out / "tensorboard"),
        "wandb": lambda: WandbTracker(out, project, name, cfg.tracking.wandb_mode, config,
                                      run_id("wandb")),
        "mlflow": lambda: MlflowTracker(out / "mlruns", project, name, config, run_id("mlflow")),
        "trackio": lambda: TrackioTracker(out / "trackio", project, name, config,
                                          run_id("trackio")),
    }
    trackers: list[Tracker] = []
    tracker = ""
    try:
        for tracker in dict.fromkeys(cfg.tracker):  # each backend once, in the configured order
            trackers.append(builders[tracker]())
            if trackers[-1].run_id is not None and trackers[-1].run_id == run_id(tracker):
                trackers[-1].resumed = {k: v for k, v in runs[tracker].items() if k != "id"}
    except BaseException as e:
        for t in trackers:
            t.close()
        if isinstance(e, Exception):  # not logged in (wandb online), a server that does not answer
            why = f"{type(e).__name__}: {e}"
            raise ConfigError(f"tracker={tracker!r} could not start: {why}") from e
        raise
    return trackers


def saved_runs(out: Path) -> dict[str, dict]:
    """``<out>/runs.json`` (``RUNS_FILE``): the trackers' runs to continue; {} when there is none
    or it cannot be read (each tracker then starts a run of its own)."""
    return read_json(out / RUNS_FILE)


def flatten(obj: dict[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """Nested dicts -> one level with "a/b" keys; other values (lists included) are kept as they
    are."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + sep, sep))
        else:
            out[path] = value
    return out


def cell(value: Any) -> Any:
    """A table cell: numbers and strings as they are, anything else (lists, None) as JSON text."""
    return (value if isinstance(value, (int, float, str)) and not isinstance(value, bool)
            else json.dumps(value))


def table(rows: list[dict]) -> dict[str, list]:
    """``columns`` (every key, in order of appearance) and ``data`` (one list of cells a row): the
    keywords of wandb's and trackio's ``Table``."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return {"columns": columns, "data": [[cell(r.get(c)) for c in columns] for r in rows]}


class JsonlTracker(Tracker):
    """The merged view: ``{"step", "metrics"}`` and ``{"step", "table", "rows"}`` lines, in arrival
    order.

    The sink replays the run's files from their start whenever it starts, so this file is rewritten
    (not appended to) when the tracker opens: it is derived, never the only copy of anything."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = path.open("w")

    def _write(self, obj: dict) -> None:
        self.f.write(json.dumps(obj) + "\n")
        self.f.flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._write({"step": step, "metrics": metrics})

    def log_table(self, name: str, rows: list[dict], step: int) -> None:
        self._write({"step": step, "table": name, "rows": rows})

    def close(self) -> None:
        self.f.close()


def markdown_table(rows: list[dict]) -> str:
    """Rows as a markdown table (TensorBoard's text plugin renders it); cells on one line each."""
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def text(v: Any) -> str:
        return str(cell(v)).replace("\\", "\\\\").replace("|", "\\|").replace("\n", "\\n")

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(text(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


class TensorBoardTracker(Tracker):
    """The sink replays the run from its start whenever it starts (a resume, `areal-like track`):
    earlier event files are removed, or TensorBoard would plot every step once per replay."""

    def __init__(self, logdir: Path):
        for old in logdir.glob("events.out.tfevents.*"):
            old.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            # torch's writer needs the tensorboard package; tensorboardX stands alone
            from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(logdir), flush_secs=5)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def log_table(self, name: str, rows: list[dict], step: int) -> None:
        self.writer.add_text(name, markdown_table(rows), global_step=step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """Each top-level series ("train", "eval") gets its own step metric ("train/step"), because
    ``wandb.log(step=...)`` drops every row whose step is below one already logged."""

    name = "wandb"

    def __init__(self, directory: Path, project: str, name: str, mode: str, config: dict,
                 run_id: str | None = None):
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        # console="off": the process hosting the sink is a supervisor whose stdout is the job's
        # result
        settings = wandb.Settings(console="off", x_disable_stats=True, save_code=False)
        self.wandb = wandb
        # a resume continues the run by its id (offline: a directory of the same id, which
        # `wandb sync` adds to that run)
        self.run = wandb.init(project=project, name=name, dir=str(directory), mode=mode,
                              config=config, settings=settings, reinit="create_new", id=run_id,
                              resume="allow" if run_id else None)
        self.run_id = self.run.id
        self.axes: set[str] = set()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        series = {key.split("/", 1)[0] for key in metrics}
        for s in series - self.axes:
            self.run.define_metric(f"{s}/step", hidden=True)
            self.run.define_metric(f"{s}/*", step_metric=f"{s}/step")
            self.axes.add(s)
        self.run.log({**metrics, **{f"{s}/step": step for s in series}})

    def log_table(self, name: str, rows: list[dict], step: int) -> None:
        # each log is a new version of the table; rows carry their "step"
        self.run.log({name: self.wandb.Table(**table(rows))})

    def close(self) -> None:
        self.run.finish()


MLFLOW_BATCH = 100  # MLflow takes at most 100 params (and 1000 metrics) per log_batch
MLFLOW_PARAM_CHARS = 6000  # MLflow's limit on one param value


class MlflowTracker(Tracker):
    """Through ``MlflowClient`` (no process-global active run); tables as JSON artifacts."""

    name = "mlflow"

    def __init__(self, directory: Path, project: str, name: str, config: dict,
                 run_id: str | None = None):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        directory.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=f"file:{directory}")
        logged = self.continued(run_id)
        if logged is None:
            exp = self.client.get_experiment_by_name(project)
            exp_id = (exp.experiment_id if exp is not None
                      else self.client.create_experiment(project))
            self.run_id, logged = self.client.create_run(exp_id, run_name=name).info.run_id, {}
        # a param keeps its first value (MLflow refuses another): a resume adds only new keys
        params = [Param(self.key(k), str(v)[:MLFLOW_PARAM_CHARS])
                  for k, v in flatten(config).items() if self.key(k) not in logged]
        for i in range(0, len(params), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + MLFLOW_BATCH])

    def continued(self, run_id: str | None) -> dict | None:
        """The params of the run ``run_id``, reopened (RUNNING again) to continue it; None when
        there is none to continue (never made, or deleted from the store)."""
        if run_id is None:
            return None
        try:
            params = self.client.get_run(run_id).data.params
        except Exception:  # noqa: BLE001 - MlflowException: no such run in this store
            return None
        self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        return params

    @staticmethod
    def key(name: str) -> str:
        """MLflow names allow only alphanumerics, _ - . / and spaces:
        "eval/pass@k" -> "eval/pass_k"."""
        return re.sub(r"[^\w./\- ]", "_", name)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        batch = [Metric(self.key(k), float(v), ms, step) for k, v in metrics.items()]
        for i in range(0, len(batch), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i:i + MLFLOW_BATCH])

    def log_table(self, name: str, rows: list[dict], step: int) -> None:
        self.client.log_dict(self.run_id, {"step": step, "rows": rows},
                             f"{self.key(name)}/step_{step:08d}.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class TrackioTracker(Tracker):
    """trackio prints its banners on stdout, which is the supervisor's result channel: they go to
    stderr."""

    name = "trackio"

    def __init__(self, directory: Path, project: str, name: str, config: dict,
                 run_id: str | None = None):
        os.environ.setdefault("TRACKIO_DIR", str(directory))
        import trackio

        self.trackio = trackio
        with contextlib.redirect_stdout(sys.stderr):
            # no CPU/GPU sampling: it would describe the supervisor's machine, not the daemons'.
            # trackio continues a run by its name (resume="allow": the newest of that name)
            self.run = trackio.init(project=project, name=run_id or name, config=config,
                                    auto_log_cpu=False, auto_log_gpu=False,
                                    resume="allow" if run_id else "never")
        self.run_id = run_id or name

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def log_table(self, name: str, rows: list[dict], step: int) -> None:
        self.run.log({name: self.trackio.Table(**table(rows))}, step=step)

    def close(self) -> None:
        with contextlib.redirect_stdout(sys.stderr):
            # finishes the run trackio.init made current, so its atexit hook has nothing left
            self.trackio.finish()
