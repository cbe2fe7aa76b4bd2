"""The attack campaign: every attack replayed against a real running job, one line each.

Starts a real job on loopback (the quickstart at test size through the real supervisor and
daemons, ``security.local_ipc=false``: every daemon on tcp with CURVE), waits
for its first trainer step, then runs each attack as a holder of a member key (the job's own
``rollout`` key: a buggy rollout server, user code that read it) or as a stranger on an HTTP port,
and prints one line per attack::

    <name> <contained|NOT CONTAINED> <what was seen>

Attacks: the hand-out by socket (``batch_theft``), the register flood, a member reading the
roster and taking a live server's id, strangers on a ``/metrics`` port and on an engine, the
reward worker reaching keys and signalling the job, malformed and oversized frames on the
buffer's CURVE port, replayed CURVE traffic, a frame nested 50,000 deep, slow and malformed HTTP
with the valid engine key, a member's engine answering 1 GiB to ``/health``, a member's sync port
forging log lines, a NaN group, a keyless client on a Ray cluster started as launch/RAY.md says,
and a checkpoint whose ``meta.pt`` runs code when loaded. Every attack is bounded in count and
time;
everything goes to 127.0.0.1; the job is stopped at the end and every process it started is
gone (checked by PID; any left is killed by PID), and its directory removed unless ``--root``
named it. Exit status: 0 when all were contained.

    python benchmarks/attack_campaign.py [--root DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from areal_like.settings.config import load_config  # noqa: E402
from benchmarks.attack_lib import ATTACKS, Target  # noqa: E402
from launch.job import job_specs, prepare  # noqa: E402
from launch.local import Supervisor  # noqa: E402
from launch.records import step_records  # noqa: E402
from launch.warmstart import ensure_warm_start  # noqa: E402

OVERRIDES = [
    "experiment=quickstart",
    "topology=local_cpu",
    "security.local_ipc=false",
    "launch.num_rollout_servers=2",
    "launch.trainer_ranks=1",
    "task.group_size=4",
    "buffer.groups_per_step=4",
    "buffer.heartbeat_timeout_s=8",
    "trainer.micro_batch_size=16",
    "trainer.steps=100000",
    "trainer.checkpoint_every=100",
    "trainer.weight_sync.deadline_s=30",
    "eval.at_end=false",
    "launch.health_timeout_s=300",
    "launch.restarts=2",
    "warm_start.steps=0",
]  # a tiny model from config: attacks need a running job, not a good one
FIRST_STEP_S = 600.0  # start-up and the first step on a loaded machine
ATTACK_S = 120.0  # no attack may take longer


class Job:
    """The running job: its supervisor on a thread, every PID it ever had (to prove none is
    left)."""

    def __init__(self, root: Path):
        cfg = load_config([*OVERRIDES, f"run_dir={root / 'run'}"])
        cfg = ensure_warm_start(cfg, log=lambda m: print(f"[warm-start] {m}", file=sys.stderr))
        self.cfg, self.topo, path = prepare(cfg)
        self.run_dir, self.lines, self.seen = Path(self.cfg.run_dir), [], {}
        self.sup = Supervisor(
            job_specs(self.cfg, self.topo, path),
            self.run_dir,
            restarts=self.cfg.launch.restarts,
            health_timeout_s=self.cfg.launch.health_timeout_s,
            echo=self.lines.append,
        )
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.stop = threading.Event()
        self.watcher = threading.Thread(target=self._watch, daemon=True)

    def _run(self) -> None:
        self.code = self.sup.run()

    def _watch(self) -> None:
        while not self.stop.wait(0.3):
            for pid in [p for p in self.sup.pids().values() if p]:
                try:
                    proc = psutil.Process(pid)
                    for q in [proc, *proc.children(recursive=True)]:
                        self.seen.setdefault(q.pid, q.create_time())
                except psutil.Error:
                    continue

    def start(self) -> None:
        self.thread.start()
        self.watcher.start()
        deadline = time.monotonic() + FIRST_STEP_S
        while not step_records(self.run_dir):
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise SystemExit(
                    "the job did not reach its first step:\n" + "\n".join(self.lines[-30:])
                )
            time.sleep(0.5)

    def close(self) -> list[int]:
        """Stop the job; the PIDs that were left behind (and then killed)."""
        self.sup.request_stop()
        self.thread.join(timeout=180)
        self.stop.set()
        self.watcher.join(timeout=5)
        left = []
        for pid, created in self.seen.items():
            try:
                proc = psutil.Process(pid)
                if (
                    abs(proc.create_time() - created) < 1e-3
                    and proc.status() != psutil.STATUS_ZOMBIE
                ):
                    left.append(pid)
                    proc.kill()
            except psutil.Error:
                continue
        return left


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--root", type=Path, default=None, help="the job's directory (default: a new temporary one)"
    )
    args = ap.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="attack-campaign-"))
    job = Job(root)
    failed = 0
    try:
        job.start()
        target = Target(job.cfg, job.topo, job.run_dir, job.sup)
        for name, attack in ATTACKS:
            t0 = time.monotonic()
            try:
                contained, seen = attack(target)
            except Exception as e:  # noqa: BLE001 - an attack that broke is reported, not contained
                contained, seen = False, f"the attack itself failed: {type(e).__name__}: {e}"
            failed += not contained
            print(
                f"{name:<22} {'contained' if contained else 'NOT CONTAINED':<14} {seen} "
                f"[{time.monotonic() - t0:.1f}s]",
                flush=True,
            )
            if time.monotonic() - t0 > ATTACK_S:
                print(f"{name} took over {ATTACK_S:.0f}s", file=sys.stderr)
        target.close()
    finally:
        left = job.close()
    if args.root is None:  # a directory of our own: nothing of the job stays behind
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"job: {job.sup.outcome} (exit {job.code}); processes left behind: {left or 'none'}; "
        f"run dir {job.run_dir if args.root else 'removed'}"
    )
    return 1 if failed or left else 0


if __name__ == "__main__":
    sys.exit(main())
