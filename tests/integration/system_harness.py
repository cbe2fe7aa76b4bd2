"""The whole system as a fixture (buffer, rollout servers, torchrun trainer under launch/local.py),
with the quickstart's warm-started tiny Qwen2; used by test_e2e.py and test_faults.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import urllib.request
from pathlib import Path

import psutil

from areal_like.net import security
from areal_like.net.auth import read_key_file
from areal_like.net.dealer import Client
from areal_like.net.metrics import scrape
from areal_like.settings.config import RunConfig, load_config
from areal_like.wire import protocol as P
from launch.job import job_specs, prepare
from launch.local import Supervisor, process_tree
from launch.records import read_jsonl
from launch.warmstart import ensure_warm_start

HOLD_S = 120.0  # longest a finished job waits for the test to look at it before stopping

BASE_OVERRIDES = [
    "experiment=quickstart",
    "launch.num_rollout_servers=2", "launch.trainer_ranks=2",  # a fixed layout, not the cores'
    "task.group_size=4", "buffer.groups_per_step=4",
    "buffer.lease_timeout_s=15", "buffer.heartbeat_timeout_s=8",
    "trainer.checkpoint_every=1", "trainer.micro_batch_size=16",
    "trainer.weight_sync.deadline_s=30",
    "launch.health_timeout_s=180", "launch.restarts=2",
]


def warm_model(root: Path) -> str:
    """The warm-started model dir, trained once per cache root (xdist workers wait on a lock)."""
    import fcntl

    cfg = load_config([*BASE_OVERRIDES, f"run_dir={root / 'warm' / 'run'}"])
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "warm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also on an error
        return ensure_warm_start(cfg, log=lambda m: None).model.path


def system_config(run_dir: Path, model_path: str, *overrides: str) -> RunConfig:
    return load_config([*BASE_OVERRIDES, f"run_dir={run_dir}", f"model.path={model_path}",
                        "warm_start.steps=0", *overrides])


class RunningSystem:
    """Context manager: the job runs on a thread; exit stops it and asserts no process is left."""

    def __init__(self, cfg: RunConfig):
        self.cfg, self.topo, config_path = prepare(cfg)
        self.run_dir = Path(self.cfg.run_dir)
        self.lines: list[str] = []
        self.sup = Supervisor(job_specs(self.cfg, self.topo, config_path), self.run_dir,
                              restarts=self.cfg.launch.restarts,
                              health_timeout_s=self.cfg.launch.health_timeout_s,
                              echo=self.lines.append)
        self.code: int | None = None
        # on completion the daemons stay up until the test releases them (or HOLD_S passes)
        self.completed, self.release = threading.Event(), threading.Event()
        self.sup.on_complete = lambda _: (self.completed.set(), self.release.wait(HOLD_S))
        self.seen: dict[int, float] = {}
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._watch_stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)

    def _main(self) -> None:
        self.code = self.sup.run()

    def _watch(self) -> None:  # remember every PID the job ever had, to prove none is left
        while not self._watch_stop.is_set():
            tree = process_tree()  # one walk of the process table a tick, not one per daemon
            todo = [p.popen.pid for p in self.sup.procs if p.popen is not None]
            while todo:
                pid = todo.pop()
                todo += tree.get(pid, [])
                if pid not in self.seen:
                    try:
                        self.seen[pid] = psutil.Process(pid).create_time()
                    except psutil.Error:
                        pass
            time.sleep(0.3)

    def __enter__(self) -> RunningSystem:
        self._thread.start()
        self._watcher.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.sup.request_stop()
        self._thread.join(timeout=180)
        self._watch_stop.set()
        self._watcher.join(timeout=5)
        left = []
        for pid, created in self.seen.items():
            try:
                proc = psutil.Process(pid)
                if (abs(proc.create_time() - created) < 1e-3
                        and proc.status() != psutil.STATUS_ZOMBIE):
                    left.append(pid)
            except psutil.Error:
                continue
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not self._thread.is_alive(), "supervisor did not stop"
        assert not left, f"processes left behind: {left}"

    # ---- watching
    def finished(self) -> bool:
        return not self._thread.is_alive()

    def records(self) -> list[dict]:
        return read_jsonl(self.run_dir / "metrics" / "trainer.jsonl")

    def steps(self) -> list[dict]:
        return [r for r in self.records() if "step" in r]

    def wait_for(self, cond, timeout_s: float, what: str, poll_s: float = 0.3):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = cond()
            if value:
                return value
            if self.finished() and self.code != 0:
                raise AssertionError(f"job ended ({self.sup.outcome}) while waiting for {what}\n"
                                     + self.tail())
            time.sleep(poll_s)
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n" + self.tail())

    def wait_step(self, n: int, timeout_s: float = 120) -> None:
        self.wait_for(lambda: any(r["step"] >= n for r in self.steps()), timeout_s,
                      f"trainer step {n}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    def metrics(self, name: str) -> dict[str, float]:
        return scrape(f"http://{self.topo.host}:{self.topo.slot(name).metrics_port}/metrics")

    @property
    def engine_key(self) -> str | None:
        """The job's engine API key (``areal-like run`` made it in the run directory)."""
        return read_key_file(self.run_dir)

    def pid(self, name: str) -> int:
        return self.sup.proc(name).popen.pid

    def client_keys(self) -> security.Keys | None:
        """The trainer's CURVE keys of this job (None without CURVE)."""
        if not self.cfg.security.curve:
            return None
        return security.load(self.cfg.resolve_path(self.cfg.security.keys_dir), "trainer")

    def buffer_request(self, msg: P.Message, timeout_s: float = 10.0) -> P.Message:
        client = Client(self.topo.buffer_address, keys=self.client_keys(), timeout_s=timeout_s)
        try:
            return client.request(msg)
        finally:
            client.close()

    def roster(self) -> dict[str, P.RosterEntry]:
        return {m.server_id: m for m in self.buffer_request(P.RosterRequest()).members}

    def buffer_stats(self) -> dict:
        return self.buffer_request(P.StatsRequest()).values


def engine_weights(engine_url: str, names: list[str],
                   key: str | None = None) -> tuple[int, dict[str, list]] | None:
    """(weight_version, full parameters) read between two equal version reads, else None."""
    return engine_prefix(engine_url, names, 1 << 30, key, timeout_s=30)


def engine_prefix(engine_url: str, names: list[str], rows: int, key: str | None = None,
                  timeout_s: float = 10) -> tuple[int, dict[str, list]] | None:
    """(weight_version, first rows rows of every parameter) at one stable version, else None
    (small reads fit between syncs; scheduler-thread reads never see a half-loaded version)."""
    auth = {"Authorization": f"Bearer {key}"} if key else {}

    def get(path: str, body: dict | None = None):
        req = urllib.request.Request(engine_url + path,
                                     data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json", **auth})
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return json.loads(r.read())

    before = get("/server_info")["weight_version"]
    params = {n: get("/get_weights_by_name", {"name": n, "truncate_size": rows}) for n in names}
    after = get("/server_info")["weight_version"]
    return (int(before), params) if before == after else None


def checkpoint_prefix(ckpt_dir: Path, rows: int, scratch: Path) -> dict | None:
    """The first rows rows of every model tensor of a DCP checkpoint (None if rotated)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    copy, out = scratch / ckpt_dir.name, scratch / f"{ckpt_dir.name}.pt"
    try:
        # a copy is quick; the trainer rotates checkpoints away fast
        shutil.copytree(ckpt_dir, copy)
        dcp_to_torch_save(str(copy), str(out))
        model = torch.load(out, weights_only=False)["model"]
    except Exception:  # deleted by checkpoint rotation (KEEP=2) while we copied it
        return None
    finally:
        shutil.rmtree(copy, ignore_errors=True)
        out.unlink(missing_ok=True)
    return {name: t[:rows].float() for name, t in model.items()}


def checksum(named: dict) -> float:
    """trainer/checkpoint.py's checksum: each tensor's float64 sum weighted by sorted position."""
    import torch

    total = torch.zeros((), dtype=torch.float64)
    for i, (_, t) in enumerate(sorted(named.items())):
        total += torch.as_tensor(t, dtype=torch.float64).sum() * (1 + (i % 7) * 1e-3)
    return float(total)


def checkpoint_checksum(run_dir: Path, version: int) -> float | None:
    import torch

    meta = run_dir / "checkpoints" / f"v{version:08d}" / "meta.pt"
    if not meta.is_file():
        return None
    return float(torch.load(meta, weights_only=False)["checksums"]["model"])
