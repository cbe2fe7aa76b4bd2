"""kill -9 of the trainer twice and the buffer once in a short job: it completes on its own.

The summary says what was rolled back (rolled_back_steps > 0) and steps_trained; no consumed group
was staler than eta; wasted generation is bounded by the rolled-back batches plus the window.
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import psutil
import pytest
from system_harness import RunningSystem, system_config, warm_model

from launch.records import outcome

WARM_CACHE = Path(tempfile.gettempdir()) / "areal-like-test-warmstart"
STEPS, ETA, B, CKPT = 30, 2, 4, 4


def _last_step(system: RunningSystem) -> int:
    steps = system.steps()
    return steps[-1]["step"] if steps else 0


def _acked(system: RunningSystem) -> int:
    return sum(int(system.metrics(f"rollout-{i}").get("areal_rollout_groups_acked_total", 0))
               for i in range(2))


def _kill_trainer(system: RunningSystem, n_resumes: int, at_least: int) -> None:
    """kill -9 of torchrun and its ranks by PID, after step at_least and 2-3 past a checkpoint
    (so that steps roll back)."""
    system.wait_for(lambda: (s := _last_step(system)) >= at_least and s % CKPT in (2, 3), 300,
                    f"a step >= {at_least} just past a checkpoint", poll_s=0.02)
    torchrun = psutil.Process(system.pid("trainer"))
    for proc in [*torchrun.children(recursive=True), torchrun]:
        os.kill(proc.pid, signal.SIGKILL)
    system.wait_for(lambda: len([r for r in system.records()
                                 if r.get("event") == "resume"]) > n_resumes, 240,
                    "the trainer to resume")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill9_trainer_twice_and_buffer_once_the_run_completes_and_says_what_it_cost(tmp_path):
    model = warm_model(WARM_CACHE)
    cfg = system_config(tmp_path / "run", model, f"trainer.steps={STEPS}",
                        f"buffer.max_staleness={ETA}", f"buffer.groups_per_step={B}",
                        f"trainer.checkpoint_every={CKPT}", "launch.restarts=3")
    with RunningSystem(cfg) as system:
        _kill_trainer(system, 0, at_least=CKPT + 1)
        system.wait_for(lambda: _last_step(system) >= 13, 300,
                        "steps after the first trainer restart")
        os.kill(system.pid("buffer"), signal.SIGKILL)
        system.wait_for(lambda: system.sup.proc("buffer").restarts == 1, 60, "the buffer restart")
        _kill_trainer(system, 1, at_least=19)  # steps after the buffer restart
        system.wait_for(system.completed.is_set, 400, "the job to complete")
        acked = _acked(system)  # rollout servers were never killed: their counters cover the run
        stale_hist = system.metrics("buffer")
    assert system.code == 0, system.tail()
    result = outcome(system.run_dir, system.code)
    resumes = [r for r in system.records() if r.get("event") == "resume"]
    assert len(resumes) == 2 and all(0 < r["rolled_back_steps"] <= CKPT for r in resumes), resumes
    # each resume gave the checkpoint's weights the last announced label: only the lost steps'
    # labels are skipped
    assert result["ok"] and result["steps_trained"] + result["rolled_back_steps"] == STEPS, result
    assert result["rolled_back_steps"] == sum(r["rolled_back_steps"] for r in resumes) > 0, result
    steps = system.steps()
    assert max(r["staleness_max"] for r in steps) <= ETA
    over = [v for k, v in stale_hist.items() if k.startswith("areal_buffer_staleness_bucket") and
            f'le="{float(ETA)}"' in k]
    # every consumed group <= eta
    assert over and over[0] == stale_hist["areal_buffer_staleness_count"]
    trained = result["steps_trained"] * B
    wasted = acked - trained
    # rolled-back batches, plus at most the staleness window, (eta + 1) * B, at each of 3 faults
    # and at the end
    assert 0 <= wasted <= result["rolled_back_steps"] * B + 4 * (ETA + 1) * B, (acked, trained)
    print(f"chaos: acked {acked}, trained {trained}, wasted {wasted} ({wasted / acked:.1%}), "
          f"rolled back {result['rolled_back_steps']}")
