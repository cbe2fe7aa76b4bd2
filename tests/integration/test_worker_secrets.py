"""Reward and tool code cannot read the job's keys or signal its processes.

Real sandbox workers (``rollout_server/sandbox.py``: the reward pool's and the tool pool's) run an
attacker's function that tries what an attack once found it could do: read
``secrets/engine_api_key`` and the CURVE secret keys in ``keys/``, list those directories, read the
rollout server's command line and environment from ``/proc``, and signal the process that started it
(signal 0: the permission check alone, and a real SIGUSR1 that this test would notice). The job's
private directories are hidden as the rollout server hides them at start (``sandbox.hide``). Only as
root: a job of another user cannot switch uid or make namespaces, which ``SECURITY.md`` states.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from areal_like.net import security
from areal_like.net.auth import ensure_key_file
from areal_like.settings.config import TaskConfig
from areal_like.tasks.datasets import Example
from benchmarks.sandbox_call import run_sandboxed
from rollout_server import sandbox
from rollout_server.reward_pool import RewardPool
from rollout_server.sandbox import SandboxLimits

ATTACK = '''
import json, os, signal


def attack(run_dir, parent_pid, plant=None):
    """Everything it reached, by name."""
    got = {}
    if plant:  # a file beside the job's own code (outside /tmp): run as root at the next start
        try:
            with open(plant, "w") as f:
                f.write("raise SystemExit('planted')")
            got["wrote code"] = True
        except OSError:
            pass
    for rel in ("secrets/engine_api_key", "keys/server.key_secret",
                "keys/clients/trainer.key_secret", "keys/clients/rollout.key_secret"):
        try:
            with open(os.path.join(run_dir, rel)) as f:
                got[rel] = f.read()[:8]
        except OSError:
            pass
    for rel in ("secrets", "keys", "keys/clients"):
        try:
            if os.listdir(os.path.join(run_dir, rel)):
                got["ls " + rel] = True
        except OSError:
            pass
    for what in ("cmdline", "environ"):
        try:
            with open(f"/proc/{parent_pid}/{what}", "rb") as f:
                got["/proc " + what] = len(f.read())
        except OSError:
            pass
    for sig in (0, signal.SIGUSR1):
        try:
            os.kill(parent_pid, sig)
            got[f"signal {int(sig)}"] = True
        except OSError:
            pass
    return got


def reward(response, example):
    return float(len(attack(example.answer, int(response))))
'''


@pytest.fixture
def job(tmp_path, monkeypatch):
    """A run directory with the job's keys and engine API key, and the attack importable."""
    run_dir = tmp_path / "run"
    security.make_keys(run_dir / "keys")
    ensure_key_file(run_dir)
    (tmp_path / "attack_fns.py").write_text(textwrap.dedent(ATTACK))
    monkeypatch.syspath_prepend(str(tmp_path))
    usr1 = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: usr1.append(1))
    try:
        yield run_dir, usr1
    finally:
        signal.signal(signal.SIGUSR1, previous)
        sandbox.hide(None)


@pytest.mark.skipif(
    os.geteuid() != 0 or sys.platform != "linux", reason="hiding needs root on Linux"
)
def test_a_sandboxed_call_reaches_no_key_and_signals_no_process(job):
    run_dir, usr1 = job
    plant = Path(sandbox.__file__).with_name(f"_planted_{os.getpid()}.py")
    try:
        before = run_sandboxed("attack_fns:attack", (str(run_dir), os.getpid(), str(plant)),
                               SandboxLimits(timeout_s=30))
        # as an attack once did
        assert before.ok and "keys/clients/trainer.key_secret" in before.value
        assert before.value.get("wrote code") and plant.exists()  # a review found this
    finally:
        plant.unlink(missing_ok=True)
    assert sandbox.hide(
        [run_dir / "keys", run_dir / "secrets"]
    )  # what the rollout server does at start
    try:
        got = run_sandboxed("attack_fns:attack", (str(run_dir), os.getpid(), str(plant)),
                            SandboxLimits(timeout_s=30))
        assert got.ok and got.value == {} and not plant.exists(), got
    finally:
        plant.unlink(missing_ok=True)
    assert usr1 == [1]  # only the unhidden call's signal came through


@pytest.mark.skipif(
    os.geteuid() != 0 or sys.platform != "linux", reason="hiding needs root on Linux"
)
def test_a_reward_in_the_pool_reaches_no_key(job):
    run_dir, usr1 = job
    assert sandbox.hide([run_dir / "keys", run_dir / "secrets"])
    pool = RewardPool(TaskConfig(reward_timeout_s=30.0, reward_workers=1), "attack_fns:reward")
    try:
        got = asyncio.run(pool.score_group("q", [str(os.getpid())], Example("q", str(run_dir))))
    finally:
        pool.close()
    assert got == [(0.0, None)] and usr1 == []  # nothing reached


@pytest.mark.skipif(
    os.geteuid() != 0 or sys.platform != "linux", reason="hiding needs root on Linux"
)
def test_code_under_tmp_is_read_only_to_a_hidden_worker(job, tmp_path, monkeypatch):
    """/tmp stays writable in a worker's namespace, so the job's code is bound read-only by name
    (``sandbox.CODE_DIRS``): a checkout or environment under /tmp (as CI's or a user's may be)
    cannot be planted into, while the rest of /tmp still can be written."""
    run_dir, _ = job
    code, scratch = tmp_path / "code", tmp_path / "scratch"
    code.mkdir()
    scratch.mkdir()
    monkeypatch.setattr(sandbox, "CODE_DIRS", (*sandbox.CODE_DIRS, str(code)))
    assert sandbox.hide([run_dir / "keys", run_dir / "secrets"])
    for where, writable in ((code, False), (scratch, True)):
        got = run_sandboxed("attack_fns:attack",
                            (str(run_dir), os.getpid(), str(where / "planted.py")),
                            SandboxLimits(timeout_s=30))
        assert got.ok and bool(got.value.get("wrote code")) is writable, (where, got)
        assert (where / "planted.py").exists() is writable
