"""kill -9 faults one after another on one job: a rollout server (its leases re-issued, it
re-registers), the trainer (resumes identical from its checkpoint), the buffer (recovers from its
WAL; nobody hangs). Between faults the books balance.
"""

from __future__ import annotations

import os
import re
import signal
import tempfile
from pathlib import Path

import pytest
from system_harness import RunningSystem, system_config, warm_model

WARM_CACHE = Path(tempfile.gettempdir()) / "areal-like-test-warmstart"
STEPS = 400  # far more than the test needs: it stops the job itself once every fault is survived


def _last_step(system: RunningSystem) -> int:
    steps = system.steps()
    return steps[-1]["step"] if steps else 0


def _books_balance(stats: dict, recovered: int = 0) -> bool:
    dropped = sum(v for k, v in stats.items() if k.startswith("groups_dropped"))
    return (stats.get("groups_accepted", 0) + recovered
            == (stats.get("groups_consumed", 0) + dropped + stats["stored"]
                + stats.get("in_transit", 0)))


def _count(stats: dict, key: str) -> int:
    return int(stats.get(key, 0))


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_kill9_rollout_trainer_and_buffer_and_the_job_goes_on(tmp_path):
    model = warm_model(WARM_CACHE)
    cfg = system_config(tmp_path / "run", model, f"trainer.steps={STEPS}", "launch.restarts=1")
    with RunningSystem(cfg) as system:
        system.wait_step(3, timeout_s=240)

        # ---- 1. rollout server
        assert _books_balance(system.buffer_stats())
        # kill it while it holds leases (otherwise there is nothing to re-issue):
        # stopped, it holds them
        old_pid, step0 = system.pid("rollout-0"), _last_step(system)
        before = system.wait_for(lambda: _stopped_holding_leases(system, old_pid), 60,
                                 "rollout-0 to hold leases")
        os.kill(old_pid, signal.SIGKILL)
        system.wait_step(step0 + 3, timeout_s=90)  # rollout-1 alone keeps the trainer fed
        # released when its next process registers or it leaves the roster, or expired
        def given_back(stats: dict) -> int:
            return _count(stats, "credits_expired") + _count(stats, "credits_released")
        system.wait_for(lambda: given_back(system.buffer_stats())
                        >= given_back(before) + before["leases_of_rollout-0"],
                        90, "the dead server's leases to be given back")
        system.wait_for(lambda: _count(system.buffer_stats(), "credits_reissued")
                        > _count(before, "credits_reissued"), 90, "its prompts to be re-issued")
        assert system.sup.proc("rollout-0").restarts == 1 and system.pid("rollout-0") != old_pid
        system.wait_for(lambda: "rollout-0" in system.roster(), 90, "rollout-0 to re-register")
        system.wait_for(lambda: system.metrics("rollout-0").get("areal_rollout_policy_version", -1)
                        >= _last_step(system) - 1 > 0, 90, "rollout-0 to serve the current version")
        system.wait_for(lambda: system.metrics("rollout-0").get(
            "areal_rollout_groups_acked_total", 0) > 0, 90, "rollout-0 to deliver groups again")
        assert _books_balance(system.buffer_stats())

        # ---- 2. trainer (kill -9 of torchrun orphans both ranks; the supervisor kills them)
        system.wait_for(lambda: (system.run_dir / "checkpoints").is_dir(), 60, "a checkpoint")
        step1 = _last_step(system)
        os.kill(system.pid("trainer"), signal.SIGKILL)
        resume = system.wait_for(lambda: [r for r in system.records()
                                          if r.get("event") == "resume"],
                                 180, "the trainer to resume")[-1]
        # checkpoint_every=1: at most the step in flight is lost
        assert resume["policy_version"] >= step1 - 1
        assert resume["checksums"] == pytest.approx(resume["saved_checksums"], rel=1e-9)
        system.wait_for(lambda: _last_step(system) >= resume["policy_version"] + 2, 120,
                        "steps after the resume")
        resumed = [r["step"] for r in system.steps()]
        # versions go on from the checkpoint, never backwards at the end
        assert resumed[-1] == max(resumed)
        assert _books_balance(system.buffer_stats())

        # ---- 3. buffer (WAL recovery; clients reconnect and re-send what was not acknowledged)
        s_before, step2 = system.buffer_stats(), _last_step(system)
        os.kill(system.pid("buffer"), signal.SIGKILL)
        system.wait_for(lambda: system.sup.proc("buffer").restarts == 1, 30, "the buffer restart")
        after = system.wait_for(lambda: _stats_or_none(system), 120,
                                "the restarted buffer to answer")
        log = (system.run_dir / "logs" / "buffer.log").read_text()
        recovered = [int(x) for x in re.findall(r"(\d+) stored now", log)]
        assert recovered, "the restarted buffer did not report its WAL recovery"
        # every stored group survives (at most one batch was handed out between the snapshot and
        # the kill)
        assert recovered[-1] >= s_before["stored"] - cfg.buffer.groups_per_step
        assert after["policy_version"] >= s_before["policy_version"]
        assert after["cursor_index"] + after["cursor_epoch"] * 10**9 >= \
            s_before["cursor_index"] + s_before["cursor_epoch"] * 10**9
        system.wait_step(step2 + 3, timeout_s=150)  # nobody hangs: generation and training go on
        assert _books_balance(system.buffer_stats(), recovered=recovered[-1])
    assert system.sup.outcome == "stopped on request"


def _stopped_holding_leases(system: RunningSystem, pid: int) -> dict | None:
    """SIGSTOP pid; the buffer's stats if it holds leases then, else SIGCONT and None."""
    os.kill(pid, signal.SIGSTOP)
    stats = system.buffer_stats()
    if stats.get("leases_of_rollout-0", 0) > 0:
        return stats
    os.kill(pid, signal.SIGCONT)
    return None


def _stats_or_none(system: RunningSystem) -> dict | None:
    try:
        return system.buffer_stats()
    except Exception:  # TransportTimeout while it replays its log
        return None
