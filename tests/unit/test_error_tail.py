"""launch/local.py error_tail: the lines of a daemon's log that say why it failed; refusal: the one
line a daemon that exited 2 refused in."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.local import error_tail, refusal

RANK_TB = ['Traceback (most recent call last):', '  File "/x/trainer/loop.py", line 9, in start',
           '    self.policy = build_policy(cfg)', 'ValueError: model.vocab_size=10 is too small']
TORCHRUN_TB = ['Traceback (most recent call last):',
               '  File "<frozen runpy>", line 198, in _run_module_as_main',
               '    raise ChildFailedError(',
               'torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ',
               '============================================================', 'trainer FAILED']


def log(tmp_path: Path, *sections: list[str]) -> Path:
    path = tmp_path / "trainer.log"
    path.write_text("".join(f"---- start 10:00:0{i}: python -m x\n"
                            + "".join(f"{ln}\n" for ln in lines)
                            for i, lines in enumerate(sections)))
    return path


@pytest.mark.parametrize("prefix", ["", "[rank0]: "])  # torchrun's rank prefixes
def test_the_ranks_traceback_not_torchruns_wrapper(tmp_path, prefix):
    tb = [f"{prefix}{ln}" for ln in RANK_TB]
    first = ["starting", *RANK_TB[:-1], "OSError: first start failed differently"]
    second = ["starting", "12:00:01 INFO loading", *tb,
              "E1122 failed (exitcode: 1) local_rank: 0", *TORCHRUN_TB]
    assert error_tail(log(tmp_path, first, second)) == tb


def test_without_a_traceback_the_last_lines_and_without_a_log_none(tmp_path):
    lines = [f"line {i}" for i in range(30)]
    assert error_tail(log(tmp_path, ["old"], lines), max_lines=20) == lines[-20:]
    assert error_tail(tmp_path / "missing.log") == []


def test_a_long_traceback_keeps_its_head_and_the_frames_nearest_the_error(tmp_path):
    frames = [f"  File \"/x/m{i}.py\", line {i}, in f{i}" for i in range(40)]
    tb = ["Traceback (most recent call last):", *frames, "KeyError: 'x'"]
    got = error_tail(log(tmp_path, tb), max_lines=20)
    assert got == [tb[0], "  ...", *tb[-18:]] and len(got) == 20


REFUSED = ["12:00:00 INFO [trainer-0 pid=7] trainer-0: CURVE on",
           "12:00:01 ERROR [trainer-0 pid=7] trainer: trainer.metrics_port=9: cannot listen on "
           "127.0.0.1: address already in use",
           "12:00:01 INFO [trainer-0 pid=7] trainer: stopped (exit 2)"]


def test_a_refusal_is_the_message_of_the_last_starts_last_error_line(tmp_path):
    older = ["12:00:00 ERROR [trainer-0 pid=5] trainer: an older start's"]
    assert refusal(log(tmp_path, older, REFUSED)) == (
        "trainer.metrics_port=9: cannot listen on 127.0.0.1: address already in use")
    ranked = [f"[rank0]: {ln}" for ln in REFUSED]  # torchrun's prefix
    assert refusal(log(tmp_path, ranked)) == refusal(log(tmp_path, REFUSED))


def test_no_refusal_without_an_error_line(tmp_path):
    assert refusal(log(tmp_path, ["12:00:01 ERROR [trainer-0 pid=5] trainer: old"],
                       ["error: not a daemon's line"])) is None
    assert refusal(tmp_path / "missing.log") is None
