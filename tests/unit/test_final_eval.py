"""launch/job.py wait_for_final_eval: until THIS run's final record is in eval.jsonl, or the
evaluating server is down, a stop, or eval.final_timeout_s (its stop_event.wait plays the server).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

from areal_like.settings.config import load_config
from launch.job import wait_for_final_eval


def cfg(timeout_s: float = 600.0):
    return load_config(["trainer.steps=8", f"eval.final_timeout_s={timeout_s}"])


def append(run_dir: Path, version: int, final: bool) -> None:
    with (run_dir / "eval.jsonl").open("a") as f:
        f.write(json.dumps({"policy_version": version, "final": final, "greedy_accuracy": 0.5})
                + "\n")


class ServerPlaysOnWait(threading.Event):
    """A stop event whose wait runs ``on_wait(n)`` (n = 1, 2, ...) instead of sleeping."""

    def __init__(self, on_wait: Callable[[int], None]):
        super().__init__()
        self.on_wait, self.waits = on_wait, 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        self.on_wait(self.waits)
        return self.is_set()


class FakeSupervisor:
    def __init__(self, stop_event: threading.Event, evaluator_alive: bool = True):
        self.stop_event, self.evaluator_alive = stop_event, evaluator_alive

    def pids(self) -> dict[str, int | None]:
        return {"buffer": 101, "rollout-0": 102 if self.evaluator_alive else None, "trainer": None}


def test_an_earlier_runs_final_record_is_not_this_runs_and_the_wait_gives_up_at_its_deadline(
        tmp_path, capsys):
    append(tmp_path, 5, True)  # the run was resumed with trainer.steps raised from 5 to 8

    def server(n: int) -> None:
        if n == 1:
            append(tmp_path, 8, False)  # a record at version 8 that is not final: not it either
        elif n == 2:
            append(tmp_path, 8, True)

    event = ServerPlaysOnWait(server)
    assert wait_for_final_eval(cfg(), tmp_path, FakeSupervisor(event)) is True
    assert event.waits == 2
    only_old = tmp_path / "old"
    only_old.mkdir()
    append(only_old, 5, True)
    assert wait_for_final_eval(cfg(timeout_s=0.2), only_old,
                               FakeSupervisor(threading.Event())) is False
    assert capsys.readouterr().err.endswith(
        "[run] no final evaluation: not written within eval.final_timeout_s=0.2\n")


def test_a_down_evaluator_ends_the_wait_unless_it_wrote_the_record_first(tmp_path, capsys):
    event = ServerPlaysOnWait(lambda n: None)
    assert wait_for_final_eval(cfg(), tmp_path,
                               FakeSupervisor(event, evaluator_alive=False)) is False
    assert event.waits == 0  # nothing would restart it: no point waiting
    assert capsys.readouterr().err.endswith(
        "[run] no final evaluation: the evaluating rollout server is down\n")
    append(tmp_path, 8, True)  # it wrote the final record, then exited
    assert wait_for_final_eval(cfg(), tmp_path,
                               FakeSupervisor(event, evaluator_alive=False)) is True


def test_a_stop_request_ends_the_wait(tmp_path, capsys):
    event = threading.Event()
    event.set()
    assert wait_for_final_eval(cfg(), tmp_path, FakeSupervisor(event)) is False
    assert capsys.readouterr().err.endswith("[run] no final evaluation: stop requested\n")
