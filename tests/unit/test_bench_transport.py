"""The transport benchmark's sealed lines and its two-ends-apart rounds (benchmarks/transport_report.py):
both are judged against the goal, the apart line says what each end pays, and the pinning really
puts every thread of each process on its half of the CPUs for the round, then gives them all back."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("transport_report", ROOT / "benchmarks" / "transport_report.py")
report = importlib.util.module_from_spec(spec)
sys.modules.setdefault("transport_report", report)
spec.loader.exec_module(report)

PLAIN = {"sender_user": 100, "sender_sys": 160, "receiver_user": 70, "receiver_sys": 85}
SEALED = {"sender_user": 150, "sender_sys": 150, "receiver_user": 135, "receiver_sys": 100}


def rates(shared: float, apart: float | None) -> dict:
    """Per-round groups/s by mode: unencrypted 4000 (3 rounds), sealed at ``shared`` and ``apart`` of it."""
    out = {("stream", "ours"): [4000.0, 3900.0, 4100.0], ("stream", "sealed"): [4000.0 * shared] * 3,
           ("stream", "curve"): [1600.0] * 3, ("stream", "raw"): [5000.0] * 3}
    if apart is not None:
        out[("stream", "ours_apart")] = [3800.0, 4000.0, 3900.0]
        out[("stream", "sealed_apart")] = [3900.0 * apart] * 3
        out[("stream", "raw_apart")] = [4875.0] * 3
    return out


def lines(shared: float, apart: float | None, tokens: int = 4096, halves=({0}, {1})) -> dict:
    split = {"sealed": SEALED, "ours": PLAIN, "sealed_apart": SEALED, "ours_apart": PLAIN}
    out = report.sealed_lines(tokens, rates(shared, apart), lambda key: 500.0, split, 534165, 3, 0.35,
                              halves if apart is not None else None)
    return {line["name"]: line for line in out}


def test_both_lines_are_judged_and_apart_says_what_each_end_pays():
    got = lines(shared=0.7, apart=0.8)
    shared, apart = got["transport_stream_8x4096_sealed"], got["transport_stream_8x4096_sealed_apart"]
    assert shared["ratio"] == 0.7 and shared["goal"] == 0.75 and shared["goal_met"] is False
    assert shared["ratio_to_raw"] == 0.56 and shared["unencrypted_ratio_to_raw"] == 0.8
    assert apart["figure"] == 3120.0 and apart["baseline"] == 3900.0 and apart["ratio"] == 0.8
    assert apart["goal"] == 0.75 and apart["goal_met"] is True
    assert apart["ratio_to_raw"] == 0.64 and apart["unencrypted_ratio_to_raw"] == 0.8
    assert apart["ends_cpus"] == {"sender": [0], "receiver": [1]}
    assert apart["sender_cpu_ratio"] == round(260 / 300, 3) and apart["receiver_cpu_ratio"] == round(155 / 235, 3)
    assert apart["cpu_split_us"] == {"sealed_apart": SEALED, "ours_apart": PLAIN}
    missed = lines(shared=0.9, apart=0.74)
    assert missed["transport_stream_8x4096_sealed"]["goal_met"] is True
    assert missed["transport_stream_8x4096_sealed_apart"]["goal_met"] is False


def test_no_goal_away_from_4096_tokens_and_no_figure_on_one_cpu():
    assert lines(0.7, 0.8, tokens=512)["transport_stream_8x512_sealed_apart"]["goal"] is None
    one_cpu = lines(0.7, None)["transport_stream_8x4096_sealed_apart"]
    assert one_cpu["figure"] is None and one_cpu["goal_met"] is None and "one CPU" in one_cpu["warning"]


def test_cpu_halves_are_disjoint_and_cover_what_this_process_may_use():
    halves = report.cpu_halves()
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        assert halves is None
        return
    first, second = halves
    assert first and second and not first & second and first | second == allowed


def allowed_cpus(pid: int) -> dict[int, set[int]]:
    return {int(tid): os.sched_getaffinity(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to put the ends apart")
def test_ends_apart_pins_every_thread_of_both_processes_for_the_round_then_frees_them():
    # a receiver with a second thread, like libzmq's I/O thread beside the Python one
    child = subprocess.Popen([sys.executable, "-c", "import threading, sys\n"
                              "threading.Thread(target=sys.stdin.read, daemon=True).start()\n"
                              "print('up', flush=True)\nsys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "up"
        halves = report.cpu_halves()
        before = os.sched_getaffinity(0)
        seen = {}

        def stream(seconds: float) -> float:
            seen["sender"], seen["receiver"] = allowed_cpus(os.getpid()), allowed_cpus(child.pid)
            return 123.0

        assert report.ends_apart(stream, child.pid, halves)(0.1) == 123.0
        assert len(seen["receiver"]) == 2
        assert all(cpus == halves[0] for cpus in seen["sender"].values())
        assert all(cpus == halves[1] for cpus in seen["receiver"].values())
        everything = halves[0] | halves[1]
        assert all(cpus == everything for cpus in allowed_cpus(child.pid).values())
        assert os.sched_getaffinity(0) == before == everything
    finally:
        child.stdin.close()
        child.wait(timeout=30)
