"""What bench_transport.py reports: its JSON lines of one group size (``summary_lines``), CPU read
from /proc (per process and per thread), and the security lines (CURVE on tcp, the same-node
ipc:// path), each against the unencrypted tcp stream of the same rounds (medians over rounds; see
bench_transport's docstring). Also ``at_least`` and ``at_least_each``, the ``type=`` of every
benchmark's count flags, and ``number_in``, that of its float flags."""

from __future__ import annotations

import argparse
import math
import os
import statistics

GROUP_SIZE = 8
GOAL_RATIO_AT_4096 = 0.8  # ours over raw ZMQ, stream pattern
# CURVE over unencrypted: security may cost at most a quarter of the throughput
GOAL_CURVE_RATIO_AT_4096 = 0.75


def child_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) of another process, from /proc."""
    return sum(cpu_split_s(pid))


def thread_cpu_s(pids: tuple[int, ...]) -> dict[tuple[int, int], float]:
    """CPU seconds of every thread of ``pids``, by (pid, thread id), from /proc. libzmq encrypts and
    decrypts CURVE frames in its I/O thread, beside the Python thread that encodes and decodes."""
    out = {}
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                out[(pid, int(tid))] = sum(cpu_split_s(pid, f"/task/{tid}"))
            except OSError:  # the thread ended
                pass
    return out


def cpu_split_s(pid: int, task: str = "") -> tuple[float, float]:
    """(user, system) CPU seconds, all threads, of a process, from /proc (clock-tick resolution)."""
    fields = open(f"/proc/{pid}{task}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) / os.sysconf("SC_CLK_TCK"), int(fields[12]) / os.sysconf("SC_CLK_TCK")


def at_least(minimum: int):
    """An argparse ``type=``: an int of ``minimum`` or more. A count below it is refused at parsing
    ("argument --trials: 0 is below 1", exit 2) rather than after the work ("no median for empty
    data")."""

    def count(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    return count


def at_least_each(minimum: int):
    """An argparse ``type=``: comma-separated ints (``--etas 0,2,8``), each ``minimum`` or more."""

    def counts(text: str) -> list[int]:
        return [at_least(minimum)(part) for part in text.split(",")]

    return counts


def number_in(low: float, high: float = math.inf, *, low_ok: bool = False):
    """An argparse ``type=``: a finite float above ``low`` (or equal to it, ``low_ok``), at most
    ``high``. ``--seconds 0``, a negative size, nan or inf is refused at parsing ("argument
    --seconds: 0 is not a finite number > 0", exit 2), not met in the middle of the work."""

    def number(text: str) -> float:
        value = float(text)
        if not (math.isfinite(value) and (value >= low if low_ok else value > low)
                and value <= high):
            bound = ">=" if low_ok else ">"
            raise argparse.ArgumentTypeError(f"{text} is not a finite number {bound} {low:g}"
                                             + (f" and <= {high:g}" if high < math.inf else ""))
        return value

    return number


def load_warning() -> dict:
    """A ``warning`` field when other work keeps the machine busy (1-minute load above its CPU
    count): absolute figures are then low and noisy; ratios of one run (modes interleaved) still
    compare."""
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load <= cpus:
        return {}
    return {"warning": f"loaded machine (1-minute load {load:.1f} on {cpus} CPUs): "
                       "compare ratios of one run only"}


def local_line(tokens: int, rates: dict, cpu_us, rounds: int, seconds: float) -> dict:
    """The stream of ours over the same-node endpoint of the CURVE socket, against unencrypted tcp
    and CURVE."""
    local, plain, curve = (statistics.median(rates[("stream", m)])
                           for m in ("local", "ours", "curve"))
    return {"name": f"transport_stream_{GROUP_SIZE}x{tokens}_local", "figure": round(local, 1),
            "unit": "groups/s", "baseline": round(plain, 1), "ratio": round(local / plain, 3),
            "goal": None, "ratio_to_curve": round(local / curve, 3),
            "cpu_us_per_group": round(cpu_us(("stream", "local")), 1),
            "unencrypted_cpu_us_per_group": round(cpu_us(("stream", "ours")), 1), "rounds": rounds,
            "round_s": seconds, "local_rounds": [round(x) for x in rates[("stream", "local")]],
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def curve_line(tokens: int, rates: dict, cpu_us, busiest: dict[str, float],
               busiest_thread: dict[str, float],
               frame_bytes: int, rounds: int, seconds: float) -> dict:
    """The stream of ours with CURVE against the same stream without it (and both against raw ZMQ).
    Load-robust twins of ``ratio``, from CPU per group by mode: ``cpu_bound_ratio`` (the busier
    process: the throughput bound with one core per process) and ``thread_bound_ratio`` (the busiest
    thread of either process: the bound where every thread has a core, as on an idle many-core node;
    libzmq runs CURVE in its I/O thread, beside the Python thread)."""
    curve, plain, raw = (statistics.median(rates[("stream", m)]) for m in ("curve", "ours", "raw"))
    goal = GOAL_CURVE_RATIO_AT_4096 if tokens == 4096 else None
    return {"name": f"transport_stream_{GROUP_SIZE}x{tokens}_curve", "figure": round(curve, 1),
            "unit": "groups/s",
            "baseline": round(plain, 1), "ratio": round(curve / plain, 3), "goal": goal,
            "goal_met": None if goal is None else curve / plain >= goal,
            "ratio_to_raw": round(curve / raw, 3),
            "unencrypted_ratio_to_raw": round(plain / raw, 3),
            "raw": round(raw, 1), "mb_s": round(curve * frame_bytes / 1e6, 1),
            "cpu_us_per_group": round(cpu_us(("stream", "curve")), 1),
            "unencrypted_cpu_us_per_group": round(cpu_us(("stream", "ours")), 1),
            "busiest_process_cpu_us": round(busiest["curve"], 1),
            "unencrypted_busiest_process_cpu_us": round(busiest["ours"], 1),
            "cpu_bound_ratio": round(busiest["ours"] / busiest["curve"], 3),
            "busiest_thread_cpu_us": round(busiest_thread["curve"], 1),
            "unencrypted_busiest_thread_cpu_us": round(busiest_thread["ours"], 1),
            "thread_bound_ratio": round(busiest_thread["ours"] / busiest_thread["curve"], 3),
            "rounds": rounds, "round_s": seconds,
            "curve_rounds": [round(x) for x in rates[("stream", "curve")]],
            "unencrypted_rounds": [round(x) for x in rates[("stream", "ours")]],
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def summary_lines(tokens: int, costs: dict, frame_bytes: int, rates: dict, cpu_s: dict,
                  split_s: dict, threads_s: dict, n_groups: dict, rounds: int, seconds: float,
                  window: int, goal_window: int) -> list[dict]:
    """bench_transport's JSON lines of one T from what the rounds measured (medians over rounds; CPU
    per group); ``costs``: the in-process encode, decode and build cost of one group. Goals are
    printed only at ``goal_window`` requests in flight."""
    enc_us, dec_us = costs["encode_us"], costs["decode_us"]

    def cpu_us(key: tuple[str, str]) -> float:
        """CPU microseconds (both processes) per group of one mode."""
        return 1e6 * cpu_s[key] / n_groups[key]

    lines = []
    for pattern in ("stream", "reqrep"):
        ours, base = rates[(pattern, "ours")], rates[(pattern, "raw")]
        figure, baseline = statistics.median(ours), statistics.median(base)
        cpu_ours, cpu_raw = cpu_us((pattern, "ours")), cpu_us((pattern, "raw"))
        ratio = figure / baseline
        goal = GOAL_RATIO_AT_4096 if (pattern == "stream" and tokens == 4096) else None
        lines.append({"name": f"transport_{pattern}_{GROUP_SIZE}x{tokens}",
                      "figure": round(figure, 1), "unit": "groups/s",
                      "baseline": round(baseline, 1), "ratio": round(ratio, 3), "goal": goal,
                      "goal_met": None if goal is None else ratio >= goal,
                      "mb_s": round(figure * frame_bytes / 1e6, 1),
                      "baseline_mb_s": round(baseline * frame_bytes / 1e6, 1),
                      "bytes_per_group": frame_bytes,
                      # load-robust companion: CPU (both processes) per group, raw over ours
                      "cpu_us_per_group": round(cpu_ours, 1),
                      "baseline_cpu_us_per_group": round(cpu_raw, 1),
                      "cpu_ratio": round(cpu_raw / cpu_ours, 3),
                      # diagnostics (clock-tick resolution): where CPU per group goes, by process
                      "cpu_split_us": {mode: dict(zip(("sender_user", "sender_sys", "receiver_user",
                                                       "receiver_sys"),
                                                      (round(1e6 * x / n_groups[(pattern, mode)])
                                                       for x in split_s[(pattern, mode)])))
                                       for mode in ("ours", "raw")},
                      "encode_us": round(enc_us, 1), "decode_us": round(dec_us, 1),
                      "rounds": rounds, "round_s": seconds, "ours_rounds": [round(x) for x in ours],
                      "raw_rounds": [round(x) for x in base],
                      "load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()})
    built, base = rates[("stream", "built")], rates[("stream", "raw")]
    lines.append({"name": f"transport_stream_{GROUP_SIZE}x{tokens}_built",
                  "figure": round(statistics.median(built), 1),
                  "unit": "groups/s", "baseline": round(statistics.median(base), 1),
                  "ratio": round(statistics.median(built) / statistics.median(base), 3),
                  "goal": None,
                  "cpu_us_per_group": round(cpu_us(("stream", "built")), 1),
                  "baseline_cpu_us_per_group": round(cpu_us(("stream", "raw")), 1),
                  "cpu_ratio": round(cpu_us(("stream", "raw")) / cpu_us(("stream", "built")), 3),
                  "build_us": round(costs["build_us"], 1), "rounds": rounds, "round_s": seconds,
                  "built_rounds": [round(x) for x in built],
                  "raw_rounds": [round(x) for x in base]})
    busiest = {m: 1e6 * max(split_s[("stream", m)][0] + split_s[("stream", m)][1],
                            split_s[("stream", m)][2] + split_s[("stream", m)][3])
                  / n_groups[("stream", m)]
               for m in ("curve", "ours")}
    busiest_thread = {m: 1e6 * max(threads_s[("stream", m)].values()) / n_groups[("stream", m)]
                      for m in ("curve", "ours")}
    lines.append(curve_line(tokens, rates, cpu_us, busiest, busiest_thread, frame_bytes, rounds,
                            seconds))
    lines.append(local_line(tokens, rates, cpu_us, rounds, seconds))
    stream = {"window": window,
              **({} if window == goal_window else {"goal": None, "goal_met": None})}
    return [{**line, **(stream if "_stream_" in line["name"] else {}), **load_warning()}
            for line in lines]
